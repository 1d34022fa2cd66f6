using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace NcclSwap.ControlPlane;

/// <summary>
/// The agent's request bell: one eventfd that every client holds (passed over the front door). A client rings it
/// after writing a request when the agent's dispatcher sleeps (it announces that in each request ring's
/// <c>sleepers</c>), so that a request after a quiet spell is served at once rather than at the next poll.
/// </summary>
public sealed unsafe class Bell : IDisposable
{
    private readonly SafeFileHandle _handle;

    private Bell(SafeFileHandle handle) => _handle = handle;

    internal int Descriptor => (int)_handle.DangerousGetHandle();

    public static Bell Create()
    {
        int fd = Interop.Sys.EventFd(0, Interop.Sys.EfdCloexec | Interop.Sys.EfdNonblock);
        if (fd < 0)
            throw new IOException($"eventfd failed (errno {Marshal.GetLastPInvokeError()})");
        return new Bell(new SafeFileHandle(fd, ownsHandle: true));
    }

    /// <summary>A bell whose descriptor came over the front door (takes ownership of it).</summary>
    public static Bell FromDescriptor(int fd) => new(new SafeFileHandle(fd, ownsHandle: true));

    /// <summary>Wakes the sleeper, if any; returns at once.</summary>
    public void Ring()
    {
        ulong one = 1;
        Interop.Sys.Write(Descriptor, &one, sizeof(ulong)); // EAGAIN (the counter is full) still leaves it rung
    }

    /// <summary>Sleeps until the bell is rung or <paramref name="timeout"/> passes, then resets it.</summary>
    public void Wait(TimeSpan timeout)
    {
        var poll = new Interop.Sys.PollFd { Fd = Descriptor, Events = Interop.Sys.PollIn };
        Interop.Sys.Poll(&poll, 1, (int)Math.Ceiling(timeout.TotalMilliseconds)); // EINTR: look again, like a timeout
        ulong count;
        Interop.Sys.Read(Descriptor, &count, sizeof(ulong));
    }

    public void Dispose() => _handle.Dispose();
}
