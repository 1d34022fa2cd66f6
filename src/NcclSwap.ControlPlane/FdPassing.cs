using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace NcclSwap.ControlPlane;

/// <summary>Sends and receives bytes together with file descriptors over a Unix socket (SCM_RIGHTS).</summary>
internal static unsafe class FdPassing
{
    public const int MaxDescriptors = 8;

    /// <summary>Sends <paramref name="bytes"/> with <paramref name="descriptors"/> attached (to the first byte); blocks until all is sent.</summary>
    public static void Send(Socket socket, ReadOnlySpan<byte> bytes, ReadOnlySpan<int> descriptors)
    {
        if (descriptors.Length > MaxDescriptors)
            throw new ArgumentException($"at most {MaxDescriptors} descriptors, not {descriptors.Length}");
        if (descriptors.Length == 0)
        {
            for (int sent = 0; sent < bytes.Length;)
                sent += socket.Send(bytes[sent..]);
            return;
        }
        int dataBytes = descriptors.Length * sizeof(int);
        int space = sizeof(Interop.Sys.CmsgHdr) + ((dataBytes + 7) & ~7);
        byte* control = stackalloc byte[space];
        new Span<byte>(control, space).Clear();
        var header = (Interop.Sys.CmsgHdr*)control;
        header->Length = (nuint)(sizeof(Interop.Sys.CmsgHdr) + dataBytes);
        header->Level = Interop.Sys.SolSocket;
        header->Type = Interop.Sys.ScmRights;
        descriptors.CopyTo(new Span<int>(control + sizeof(Interop.Sys.CmsgHdr), descriptors.Length));
        fixed (byte* data = bytes)
        {
            var iov = new Interop.Sys.IoVec { Base = (nint)data, Length = (nuint)bytes.Length };
            var message = new Interop.Sys.MsgHdr { Iov = (nint)(&iov), IovLength = 1, Control = (nint)control, ControlLength = (nuint)space };
            nint sent;
            int errno;
            do
            {
                sent = Interop.Sys.SendMsg((int)socket.SafeHandle.DangerousGetHandle(), &message, 0);
                errno = sent < 0 ? Marshal.GetLastPInvokeError() : 0;
            }
            while (errno == 4 /* EINTR */);
            if (sent < 0)
                throw new IOException($"sendmsg failed (errno {errno})");
            for (int done = (int)sent; done < bytes.Length;) // the descriptors went with the first part
                done += socket.Send(bytes[done..]);
        }
    }

    /// <summary>
    /// Receives one message into <paramref name="buffer"/>; returns its length and the descriptors that came with
    /// it (the caller owns them). With <paramref name="dontWait"/>, a length of -1 means nothing was there yet.
    /// </summary>
    public static (int Length, int[] Descriptors) Receive(Socket socket, Span<byte> buffer, bool dontWait = false)
    {
        int space = sizeof(Interop.Sys.CmsgHdr) + MaxDescriptors * sizeof(int);
        byte* control = stackalloc byte[space];
        fixed (byte* data = buffer)
        {
            var iov = new Interop.Sys.IoVec { Base = (nint)data, Length = (nuint)buffer.Length };
            var message = new Interop.Sys.MsgHdr { Iov = (nint)(&iov), IovLength = 1, Control = (nint)control, ControlLength = (nuint)space };
            int flags = 0x40000000 /* MSG_CMSG_CLOEXEC */ | (dontWait ? 0x40 /* MSG_DONTWAIT */ : 0);
            nint received;
            int errno;
            do
            {
                message.ControlLength = (nuint)space;
                received = Interop.Sys.RecvMsg((int)socket.SafeHandle.DangerousGetHandle(), &message, flags);
                errno = received < 0 ? Marshal.GetLastPInvokeError() : 0;
            }
            while (errno == 4 /* EINTR: a signal (a child's exit, say) came first */);
            if (received < 0)
            {
                if (dontWait && errno == 11 /* EAGAIN */)
                    return (-1, []);
                throw new IOException($"recvmsg failed (errno {errno})");
            }
            var descriptors = new List<int>();
            if (message.ControlLength >= (nuint)sizeof(Interop.Sys.CmsgHdr))
            {
                var header = (Interop.Sys.CmsgHdr*)control;
                if (header->Level == Interop.Sys.SolSocket && header->Type == Interop.Sys.ScmRights)
                {
                    int count = ((int)header->Length - sizeof(Interop.Sys.CmsgHdr)) / sizeof(int);
                    descriptors.AddRange(new ReadOnlySpan<int>(control + sizeof(Interop.Sys.CmsgHdr), count));
                }
            }
            return ((int)received, [.. descriptors]);
        }
    }
}
