using System.Net.Sockets;
using System.Text;
using System.Text.Json;

namespace NcclSwap.ControlPlane;

/// <summary>The refusal of the agent's front door, with its reason.</summary>
public sealed class ChannelRefusedException(string message) : Exception(message);

/// <summary>
/// A client's session with the agent (the C# counterpart of the Python client's <c>connect</c>): the version
/// table (read-only) and the session's rings, received as descriptors. Dispose ends the session.
/// </summary>
public sealed class ChannelClient : IDisposable
{
    private readonly Socket _socket;

    private ChannelClient(Socket socket, long session, Role role, VersionTable table, SharedRing requests, SharedRing responses)
    {
        _socket = socket;
        Session = session;
        Role = role;
        Table = table;
        Requests = requests;
        Responses = responses;
    }

    public long Session { get; }

    public Role Role { get; }

    public VersionTable Table { get; }

    /// <summary>This client writes requests here.</summary>
    public SharedRing Requests { get; }

    /// <summary>The agent's responses arrive here.</summary>
    public SharedRing Responses { get; }

    public static ChannelClient Connect(string socketPath, Role role, string weightSet, TimeSpan? timeout = null)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        int[] descriptors = [];
        try
        {
            socket.ReceiveTimeout = socket.SendTimeout = (int)(timeout ?? TimeSpan.FromSeconds(10)).TotalMilliseconds;
            socket.Connect(new UnixDomainSocketEndPoint(socketPath));
            var json = new MemoryStream();
            using (var writer = new Utf8JsonWriter(json))
            {
                writer.WriteStartObject();
                writer.WriteString("role", role.ToString().ToLowerInvariant());
                writer.WriteString("weight_set", weightSet);
                writer.WriteEndObject();
            }
            string hello = Encoding.UTF8.GetString(json.ToArray()) + "\n";
            socket.Send(Encoding.UTF8.GetBytes(hello));
            byte[] buffer = new byte[FrontDoor.MaxHelloBytes];
            (int length, descriptors) = FdPassing.Receive(socket, buffer);
            if (length == 0)
                throw new ChannelRefusedException($"{socketPath}: the agent closed the connection without an answer");
            using JsonDocument reply = JsonDocument.Parse(buffer.AsMemory(0, length));
            if (!reply.RootElement.GetProperty("ok").GetBoolean())
                throw new ChannelRefusedException($"{socketPath}: {reply.RootElement.GetProperty("error").GetString()}");
            if (descriptors.Length != 3)
                throw new IOException($"{socketPath}: the agent sent {descriptors.Length} descriptors, not 3 (table, requests, responses)");
            long session = reply.RootElement.GetProperty("session").GetInt64();
            VersionTable table = VersionTable.FromDescriptor(descriptors[0]);
            SharedRing requests = SharedRing.FromDescriptor(descriptors[1], $"session {session} requests");
            SharedRing responses = SharedRing.FromDescriptor(descriptors[2], $"session {session} responses");
            descriptors = [];
            return new ChannelClient(socket, session, role, table, requests, responses);
        }
        catch
        {
            foreach (int fd in descriptors)
                new Microsoft.Win32.SafeHandles.SafeFileHandle(fd, ownsHandle: true).Dispose();
            socket.Dispose();
            throw;
        }
    }

    public void Dispose()
    {
        Requests.Dispose();
        Responses.Dispose();
        Table.Dispose();
        _socket.Dispose();
    }
}
