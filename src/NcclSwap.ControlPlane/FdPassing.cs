using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace NcclSwap.ControlPlane;

/// <summary>Sends and receives bytes together with file descriptors over a Unix socket (SCM_RIGHTS).</summary>
internal static unsafe class FdPassing
{
    public const int MaxDescriptors = 8;

    /// <summary>Sends <paramref name="bytes"/> (at most one message) with <paramref name="descriptors"/> attached.</summary>
    public static void Send(Socket socket, ReadOnlySpan<byte> bytes, ReadOnlySpan<int> descriptors)
    {
        if (descriptors.Length is 0 or > MaxDescriptors)
            throw new ArgumentException($"1 to {MaxDescriptors} descriptors, not {descriptors.Length}");
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
            nint sent = Interop.Sys.SendMsg((int)socket.SafeHandle.DangerousGetHandle(), &message, 0);
            if (sent != bytes.Length)
                throw new IOException($"sendmsg sent {sent} of {bytes.Length} bytes (errno {Marshal.GetLastPInvokeError()})");
        }
    }

    /// <summary>Receives one message into <paramref name="buffer"/>; returns its length and the descriptors that came with it (the caller owns them).</summary>
    public static (int Length, int[] Descriptors) Receive(Socket socket, Span<byte> buffer)
    {
        int space = sizeof(Interop.Sys.CmsgHdr) + MaxDescriptors * sizeof(int);
        byte* control = stackalloc byte[space];
        fixed (byte* data = buffer)
        {
            var iov = new Interop.Sys.IoVec { Base = (nint)data, Length = (nuint)buffer.Length };
            var message = new Interop.Sys.MsgHdr { Iov = (nint)(&iov), IovLength = 1, Control = (nint)control, ControlLength = (nuint)space };
            nint received = Interop.Sys.RecvMsg((int)socket.SafeHandle.DangerousGetHandle(), &message, 0x40000000 /* MSG_CMSG_CLOEXEC */);
            if (received < 0)
                throw new IOException($"recvmsg failed (errno {Marshal.GetLastPInvokeError()})");
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
