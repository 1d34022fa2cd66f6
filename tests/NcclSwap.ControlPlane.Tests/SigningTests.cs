using System.Text.Json;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Audit;
using NcclSwap.ControlPlane.Signing;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>Signed versions: the agent activates only what a trusted key signed, and enters every refusal in its audit log.</summary>
public sealed class SigningTests
{
    private static readonly SyntheticModel Model = SyntheticModel.Tiny;

    private static (string Private, string Public) NewKey(string folder, string name)
    {
        string privatePath = Path.Combine(folder, name + ".key"), publicPath = Path.Combine(folder, name + ".pub");
        SigningKey.Generate(privatePath, publicPath);
        return (privatePath, publicPath);
    }

    private static void AssertServes(TestAgent agent, ConsumerClient consumer, ulong version)
    {
        Served.StepUntil(agent, consumer, version);
        Served.AssertHolds(consumer, version);
    }

    [Fact]
    public async Task Only_versions_signed_by_a_trusted_key_for_their_own_bytes_and_number_are_activated_and_every_refusal_is_audited()
    {
        string keys = Directory.CreateTempSubdirectory("nccl-swap-keys-").FullName;
        try
        {
            var trusted = NewKey(keys, "trainer");
            var stranger = NewKey(keys, "stranger");
            await using TestAgent agent = TestAgent.Start(configure: (o, _) => o with
            {
                WeightSets = new Dictionary<string, WeightSetPolicy> { ["llama"] = new() { RequireSignature = true, TrustedKeys = [TrustedKey.Load(trusted.Public)] } },
            });
            using var signer = SigningKey.Load(trusted.Private);
            using var other = SigningKey.Load(stranger.Private);
            RegionLayout layout = Model.Layout();
            using var consumer = ConsumerClient.Connect(agent.SocketPath, "llama", layout, ConsumerMode.Flip);
            using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", layout);

            PublishResult Publish(ulong version, SigningKey? key, Manifest? manifest = null, ulong? fillWith = null)
            {
                SyntheticModel.Fill(fillWith ?? version, publisher.Tensors.Layout, publisher.Tensors.Pointer);
                return publisher.Publish(version, wait: true, signer: key, manifest: manifest);
            }

            // Signed by the trusted key: activated, byte for byte.
            Assert.True(Publish(1, signer).Ok);
            AssertServes(agent, consumer, 1);
            Assert.Equal(VersionSignature.IdText(signer.Id), agent.Outcome("llama", 1)!.Signer);

            // Unsigned, where signing is required.
            PublishResult unsigned = Publish(2, null);
            Assert.Equal(Status.NotPermitted, unsigned.Status);
            Assert.Contains("version 2 is unsigned", unsigned.Detail);
            // Signed, but by a key the agent does not trust for this set.
            PublishResult wrongKey = Publish(3, other);
            Assert.Equal(Status.NotPermitted, wrongKey.Status);
            Assert.Contains($"signed by key {VersionSignature.IdText(other.Id)}, which is not trusted", wrongKey.Detail);
            // Forged: the trusted key's signature, but of other bytes (version 1's manifest) than those published.
            SyntheticModel.Fill(1, publisher.Tensors.Layout, publisher.Tensors.Pointer);
            Manifest ofVersion1 = PublisherClient.ManifestOf(publisher.Tensors);
            PublishResult forged = Publish(4, signer, manifest: ofVersion1);
            Assert.Equal(Status.NotPermitted, forged.Status);
            Assert.Contains("does not match 'llama' version 4", forged.Detail);
            // A signature moved to another version number: version 1's bytes signed as version 5, published as 6.
            SyntheticModel.Fill(6, publisher.Tensors.Layout, publisher.Tensors.Pointer);
            Request moved = VersionSignature.Attach(publisher.Channel.NewRequest(RequestKind.Publish, 6, AbiConstants.PublishWait), signer.Id,
                signer.Sign("llama", 5, PublisherClient.ManifestOf(publisher.Tensors).Sha256));
            Response movedAnswer = publisher.Channel.Call(moved, TimeSpan.FromSeconds(30));
            Assert.Equal(Status.NotPermitted, movedAnswer.Status);
            // Replayed: version 1 again, with a valid signature of version 1's bytes.
            PublishResult replay = Publish(1, signer);
            Assert.Equal(Status.Stale, replay.Status);
            Assert.Contains("not newer than", replay.Detail);
            // A payload that is not a signature.
            Request garbage = publisher.Channel.NewRequest(RequestKind.Publish, 7, AbiConstants.PublishWait) with { PayloadBytes = 5 };
            Assert.Equal(Status.NotPermitted, publisher.Channel.Call(garbage, TimeSpan.FromSeconds(30)).Status);

            // Nothing refused was activated: the consumer still serves version 1, exactly.
            Assert.Equal(VersionEntry.PackState(1, 0), agent.Core!.Table.ReadState(0));
            consumer.Step();
            AssertServes(agent, consumer, 1);
            foreach (ulong refused in new ulong[] { 2, 3, 4, 6, 7 })
                Assert.Equal(UpdateResult.Refused, agent.Outcome("llama", refused)!.Result);

            // The next signed version goes through.
            Assert.True(Publish(8, signer).Ok);
            AssertServes(agent, consumer, 8);

            // Every refusal is in the audit log, under the publisher, with the reason; the chain is intact.
            List<JsonElement> entries = [.. AuditLog.Read(agent.Core.Options.AuditLogPath)];
            JsonElement Entry(ulong version, string outcome) => entries.Single(e => e.GetProperty("action").GetString() == "publish"
                && e.GetProperty("version").ValueKind == JsonValueKind.Number && e.GetProperty("version").GetUInt64() == version && e.GetProperty("outcome").GetString() == outcome);
            Assert.Contains("unsigned", Entry(2, "refused").GetProperty("detail").GetString());
            Assert.Contains("not trusted", Entry(3, "refused").GetProperty("detail").GetString());
            Assert.Contains("does not match", Entry(4, "refused").GetProperty("detail").GetString());
            Assert.Contains("does not match", Entry(6, "refused").GetProperty("detail").GetString());
            Assert.Contains("not newer than", Entry(1, "denied").GetProperty("detail").GetString());
            Assert.Contains("a signature of 72 bytes", Entry(7, "refused").GetProperty("detail").GetString());
            JsonElement activated = Entry(8, "activated");
            Assert.Contains($"signed by key {VersionSignature.IdText(signer.Id)}", activated.GetProperty("detail").GetString());
            Assert.Equal(64, activated.GetProperty("manifest").GetString()!.Length);
            Assert.Equal((uint)Environment.ProcessId, (uint)Entry(2, "refused").GetProperty("who").GetProperty("pid").GetInt32());
            Assert.True(AuditLog.Verify(agent.Core.Options.AuditLogPath).Intact);
        }
        finally
        {
            Directory.Delete(keys, recursive: true);
        }
    }

    [Fact]
    public void Key_files_are_made_new_private_to_their_owner_and_refused_by_name_when_they_are_not_keys()
    {
        string keys = Directory.CreateTempSubdirectory("nccl-swap-keys-").FullName;
        try
        {
            var (privatePath, publicPath) = NewKey(keys, "k");
            Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(privatePath));
            Assert.Throws<KeyFileException>(() => SigningKey.Generate(privatePath, Path.Combine(keys, "other.pub")));
            using var key = SigningKey.Load(privatePath);
            Assert.Equal(key.Id, TrustedKey.Load(publicPath).Id);
            var notKey = Path.Combine(keys, "not.pub");
            File.WriteAllText(notKey, "hello");
            Assert.Contains("not.pub: not an ECDSA P-256 key in PEM", Assert.Throws<KeyFileException>(() => TrustedKey.Load(notKey)).Message);
            Assert.Contains("holds no private key", Assert.Throws<KeyFileException>(() => SigningKey.Load(publicPath)).Message);
        }
        finally
        {
            Directory.Delete(keys, recursive: true);
        }
    }
}
