using System.CommandLine;
using NcclSwap.ControlPlane.Signing;

namespace NcclSwap.Agent.Keys;

/// <summary><c>nccl-swap keys generate --out PREFIX</c>: a signing key pair for a publisher, PREFIX.key (0600) and PREFIX.pub.</summary>
internal static class KeysCommand
{
    public static Command Create(TextWriter output, TextWriter error)
    {
        var prefix = new Option<string>("--out") { Description = "Writes PREFIX.key (the private key, 0600) and PREFIX.pub (for the agent's TrustedKeys).", Required = true };
        var generate = new Command("generate", "Make an ECDSA P-256 key pair to sign versions with.") { prefix };
        generate.SetAction(result =>
        {
            string at = result.GetValue(prefix)!;
            try
            {
                ulong id = SigningKey.Generate(at + ".key", at + ".pub");
                output.WriteLine($"key {VersionSignature.IdText(id)}: {at}.key (private, 0600), {at}.pub (public: list it in Agent:WeightSets:NAME:TrustedKeys)");
                return 0;
            }
            catch (Exception e) when (e is KeyFileException or IOException or UnauthorizedAccessException)
            {
                error.WriteLine($"nccl-swap keys generate: {e.Message}");
                return 1;
            }
        });
        return new Command("keys", "Signing keys for versions.") { generate };
    }
}
