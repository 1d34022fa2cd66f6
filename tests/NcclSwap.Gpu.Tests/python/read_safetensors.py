"""Reads safetensors files with the reference library; prints one JSON object per file, keyed by path."""
import hashlib
import json
import sys

import safetensors
from safetensors import deserialize, safe_open


def read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            blob = f.read()
        tensors = {
            name: {
                "dtype": str(info["dtype"]),
                "shape": list(info["shape"]),
                "sha256": hashlib.sha256(bytes(info["data"])).hexdigest(),
            }
            for name, info in deserialize(blob)
        }
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        return {"ok": True, "tensors": tensors, "metadata": metadata}
    except Exception as e:  # the test reports which file the library refused, and why
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    print(json.dumps({"version": safetensors.__version__, "files": {p: read(p) for p in sys.argv[1:]}}))
