using NcclSwap.Cuda;
using NcclSwap.DataPlane;

namespace NcclSwap.WeightSets.Tests;

public class ManifestTests
{
    [Fact]
    public void A_manifest_lists_every_tensor_with_its_digest_and_is_canonical()
    {
        using var files = new Files();
        List<TensorData> tensors = Files.EveryDtype(seed: 30);
        string path = files.PathOf("m.safetensors");
        SafetensorsWriter.Write(path, tensors);
        using LoadedCheckpoint loaded = CheckpointLoader.Load(Checkpoint.Open(path), PinnedBuffer.AllocatePageable);
        Manifest manifest = loaded.CreateManifest();

        Assert.Equal(tensors.Count, manifest.Tensors.Count);
        Assert.Equal(manifest.Tensors.Select(t => t.Name).Order(StringComparer.Ordinal), manifest.Tensors.Select(t => t.Name));
        foreach (TensorData t in tensors)
        {
            ManifestEntry entry = manifest.Tensors.Single(e => e.Name == t.Name);
            Assert.Equal(BlockDigest.Compute(t.Data.Span), entry.Digest);
            Assert.Equal(t.Data.Length, entry.Bytes);
            Assert.Equal(t.Shape, entry.Shape);
        }
        Assert.Matches("^[0-9a-f]{64}$", manifest.Sha256);

        // The same set in another order encodes to the same bytes; a changed byte changes both digests.
        Manifest shuffled = Manifest.Create(manifest.Tensors.Reverse());
        Assert.True(manifest.CanonicalBytes.SequenceEqual(shuffled.CanonicalBytes));
        Assert.Equal(manifest.Sha256, shuffled.Sha256);
        ManifestEntry first = manifest.Tensors[0];
        Manifest changed = Manifest.Create(manifest.Tensors.Skip(1).Append(first with { Digest = new Digest(first.Digest.Value ^ 1) }));
        Assert.NotEqual(manifest.Sha256, changed.Sha256);
        Assert.NotEqual(manifest.Digest, changed.Digest);

        Manifest parsed = Manifest.Parse(manifest.CanonicalBytes);
        Assert.Equal(manifest.Sha256, parsed.Sha256);
    }

    [Fact]
    public void Non_canonical_or_duplicate_manifests_are_refused()
    {
        var entry = new ManifestEntry("a", "F32", [2], 8, new Digest(1));
        Manifest manifest = Manifest.Create([entry, entry with { Name = "b" }]);
        byte[] spaced = [.. manifest.CanonicalBytes[..1], (byte)' ', .. manifest.CanonicalBytes[1..]];
        Assert.Contains("canonical", Assert.Throws<FormatException>(() => Manifest.Parse(spaced)).Message);
        Assert.Throws<FormatException>(() => Manifest.Parse("{}"u8));
        Assert.Contains("appears twice", Assert.Throws<ArgumentException>(() => Manifest.Create([entry, entry])).Message);
    }
}
