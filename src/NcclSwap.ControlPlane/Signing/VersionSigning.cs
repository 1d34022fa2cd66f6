using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane.Signing;

/// <summary>A key file that could not be read, named with the reason.</summary>
public sealed class KeyFileException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// What a publisher signs for a version: ECDSA P-256 over SHA-256 of
/// <c>"nccl-swap-version/1\n" + weight set + "\n" + version + "\n" + manifest SHA-256 (hex)</c>, so a signature
/// binds the bytes (through the manifest's SHA-256), the weight set and the version: it cannot be replayed for
/// another version or set. In a PUBLISH request's payload: the key's id (8 bytes), then the signature as r ‖ s
/// (64 bytes, IEEE P1363).
/// </summary>
public static class VersionSignature
{
    public const int KeyIdBytes = 8;
    public const int SignatureBytes = 64;
    public const int PayloadBytes = KeyIdBytes + SignatureBytes;

    public static byte[] Message(string weightSet, ulong version, string manifestSha256) =>
        Encoding.UTF8.GetBytes($"nccl-swap-version/1\n{weightSet}\n{version}\n{manifestSha256}");

    /// <summary>Puts a signature into <paramref name="request"/>'s payload.</summary>
    public static Request Attach(Request request, ulong keyId, ReadOnlySpan<byte> signature)
    {
        if (signature.Length != SignatureBytes)
            throw new ArgumentException($"a signature is {SignatureBytes} bytes, not {signature.Length}", nameof(signature));
        Span<byte> payload = request.Payload;
        BinaryPrimitives.WriteUInt64LittleEndian(payload, keyId);
        signature.CopyTo(payload[KeyIdBytes..]);
        request.PayloadBytes = PayloadBytes;
        return request;
    }

    /// <summary>The signature a PUBLISH request carries, or null when it carries none; malformed payloads are refused by name.</summary>
    public static (ulong KeyId, byte[] Signature)? Read(in Request request)
    {
        if (request.PayloadBytes == 0)
            return null;
        if (request.PayloadBytes != PayloadBytes)
            throw new FormatException($"a publish's payload is a signature of {PayloadBytes} bytes (key id, r, s), not {request.PayloadBytes} bytes");
        ReadOnlySpan<byte> payload = request.Payload;
        return (BinaryPrimitives.ReadUInt64LittleEndian(payload), payload[KeyIdBytes..PayloadBytes].ToArray());
    }

    /// <summary>A key's id: the first 8 bytes of SHA-256 of its SubjectPublicKeyInfo, little-endian; shown as 16 hex digits.</summary>
    internal static ulong IdOf(ECDsa key) => BinaryPrimitives.ReadUInt64LittleEndian(SHA256.HashData(key.ExportSubjectPublicKeyInfo()));

    public static string IdText(ulong id) => id.ToString("x16", System.Globalization.CultureInfo.InvariantCulture);

    internal static ECDsa Load(string path, bool isPrivate)
    {
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new KeyFileException($"{path}: cannot read the {(isPrivate ? "signing" : "public")} key: {e.Message}", e);
        }
        var key = ECDsa.Create();
        try
        {
            key.ImportFromPem(text);
            if (key.KeySize != 256 || key.ExportParameters(false).Curve.Oid.Value != ECCurve.NamedCurves.nistP256.Oid.Value)
                throw new KeyFileException($"{path}: the key is not on the P-256 curve (nistP256)");
            if (isPrivate && !text.Contains("PRIVATE KEY", StringComparison.Ordinal))
                throw new KeyFileException($"{path}: holds no private key (a signing key is a PKCS#8 'PRIVATE KEY' PEM)");
            return key;
        }
        catch (Exception e) when (e is ArgumentException or CryptographicException)
        {
            key.Dispose();
            throw new KeyFileException($"{path}: not an ECDSA P-256 key in PEM: {e.Message}", e);
        }
        catch
        {
            key.Dispose();
            throw;
        }
    }
}

/// <summary>A publisher's signing key (ECDSA P-256, a PKCS#8 PEM file readable by its owner alone).</summary>
public sealed class SigningKey : IDisposable
{
    private readonly ECDsa _key;

    private SigningKey(ECDsa key)
    {
        _key = key;
        Id = VersionSignature.IdOf(key);
    }

    public ulong Id { get; }

    public static SigningKey Load(string path) => new(VersionSignature.Load(path, isPrivate: true));

    /// <summary>
    /// Makes a new key pair: <paramref name="privatePath"/> (PKCS#8 PEM, mode 0600, created new: an existing file is
    /// never overwritten) and <paramref name="publicPath"/> (SubjectPublicKeyInfo PEM, 0644). Returns the key's id.
    /// </summary>
    public static ulong Generate(string privatePath, string publicPath)
    {
        using ECDsa key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        foreach (string path in new[] { privatePath, publicPath })
            if (File.Exists(path))
                throw new KeyFileException($"{path}: exists already; a key file is never overwritten");
        var options = new FileStreamOptions { Mode = FileMode.CreateNew, Access = FileAccess.Write, UnixCreateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite };
        using (var writer = new StreamWriter(privatePath, Encoding.ASCII, options))
            writer.Write(key.ExportPkcs8PrivateKeyPem() + "\n");
        options.UnixCreateMode |= UnixFileMode.GroupRead | UnixFileMode.OtherRead;
        using (var writer = new StreamWriter(publicPath, Encoding.ASCII, options))
            writer.Write(key.ExportSubjectPublicKeyInfoPem() + "\n");
        return VersionSignature.IdOf(key);
    }

    public byte[] Sign(string weightSet, ulong version, string manifestSha256) =>
        _key.SignData(VersionSignature.Message(weightSet, version, manifestSha256), HashAlgorithmName.SHA256, DSASignatureFormat.IeeeP1363FixedFieldConcatenation);

    public void Dispose() => _key.Dispose();
}

/// <summary>A public key the agent trusts for a weight set's versions.</summary>
public sealed class TrustedKey
{
    private readonly ECDsa _key;

    private TrustedKey(string path, ECDsa key)
    {
        Path = path;
        _key = key;
        Id = VersionSignature.IdOf(key);
    }

    public string Path { get; }

    public ulong Id { get; }

    public static TrustedKey Load(string path) => new(path, VersionSignature.Load(path, isPrivate: false));

    public bool Verify(string weightSet, ulong version, string manifestSha256, ReadOnlySpan<byte> signature)
    {
        lock (_key) // one ECDsa object is not meant for concurrent use
            return _key.VerifyData(VersionSignature.Message(weightSet, version, manifestSha256), signature, HashAlgorithmName.SHA256, DSASignatureFormat.IeeeP1363FixedFieldConcatenation);
    }

    public override string ToString() => $"{VersionSignature.IdText(Id)} ({Path})";
}
