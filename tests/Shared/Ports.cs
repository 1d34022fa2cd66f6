using System.Net;
using System.Net.Sockets;

namespace NcclSwap.Testing;

/// <summary>Loopback ports for tests that must name one up front (a swap group's root address in its configuration).</summary>
internal static class Ports
{
    /// <summary>A port that was free a moment ago (the system picked it; another process could still take it first).</summary>
    public static int Free()
    {
        using var probe = new TcpListener(IPAddress.Loopback, 0);
        probe.Start();
        return ((IPEndPoint)probe.LocalEndpoint).Port;
    }
}
