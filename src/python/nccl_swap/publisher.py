"""The trainer's side: tensors registered once, then publish(version) per step."""

from typing import Optional

from . import abi
from .channel import DEFAULT_SOCKET, Response, Session, connect
from .layout import Layout
from .region import WeightRegion


class Publisher:
    """A publisher of weight set ``weight_set``: its tensors live in :attr:`region` (shared memory the agent maps).

    Write a version's weights into ``region.tensor(name)``, then :meth:`publish`: it returns once the agent has
    its own copy, after which the trainer may change the tensors again.
    """

    def __init__(self, weight_set: str, layout: Layout, socket_path: str = DEFAULT_SOCKET, timeout: float = 60.0):
        self.weight_set = weight_set
        self.socket_path = socket_path
        self.timeout = timeout
        self.region = WeightRegion("tensors", layout)
        try:
            self.session: Session = self._register()
        except BaseException:
            self.region.close()
            raise

    @property
    def layout(self) -> Layout:
        return self.region.layout

    def _register(self) -> Session:
        return connect("publisher", self.weight_set, self.socket_path, self.timeout, self.region.layout, [self.region])

    def tensor(self, name: str) -> memoryview:
        return self.region.tensor(name)

    def publish(self, version: int, wait: bool = False, timeout: Optional[float] = None) -> Response:
        """Publishes ``version`` (greater than any before). Returns the agent's answer once the snapshot is taken,
        or with ``wait`` once the version is activated, superseded or has failed; ``Response.check()`` raises on
        an error status. Raises :class:`ClosedError` if the agent goes away (then :meth:`reconnect`)."""
        entry = self.session.request(abi.RequestKind.PUBLISH, version, abi.PUBLISH_WAIT if wait else 0)
        return self.session.call(entry, self.timeout if timeout is None else timeout)

    def reconnect(self) -> None:
        """A new session with the agent (after it restarted), registering the same tensors."""
        fresh = self._register()
        self.session.close()
        self.session = fresh

    def close(self) -> None:
        self.session.close()
        self.region.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
