using NcclSwap.ControlPlane.State;
using NcclSwap.Testing;

namespace NcclSwap.ControlPlane.Tests;

public sealed class StateStoreTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-state-").FullName;

    private static AgentState Sample(ulong version) => new(
    [
        new WeightSetState("llama", new ActiveVersion(version, (int)(version % 2), 0xABCDEF0123456789), version - 1, version + 2,
            new StagedFile(version, $"000-llama.{version}", 0xABCDEF0123456789), new StagedFile(version - 1, "000-llama.0", 0x42)),
        new WeightSetState("qwen", null, 0, 0),
    ], AuditPosition: 4096);

    [Fact]
    public void State_round_trips_and_a_crashed_save_leaves_the_previous_one()
    {
        var store = new StateStore(Path.Combine(_folder, "state.json"));
        Assert.Equal(AgentState.Empty, store.Load());
        store.Save(Sample(7));
        AgentState loaded = store.Load();
        Assert.Equal(Sample(7).WeightSets, loaded.WeightSets);
        Assert.Equal(4096, loaded.AuditPosition);

        // A save that died before its rename leaves a partial file: the saved state stands, the partial goes.
        File.WriteAllBytes(store.Path + ".partial", TestData.Random(100, seed: 1));
        Assert.Equal(Sample(7).WeightSets, store.Load().WeightSets);
        Assert.False(File.Exists(store.Path + ".partial"));

        store.Save(Sample(8));
        Assert.Equal(8UL, store.Load().WeightSets[0].Active!.Version);
    }

    [Fact]
    public void A_state_written_ahead_is_renamed_in_when_it_is_what_is_saved_and_dropped_when_not()
    {
        var store = new StateStore(Path.Combine(_folder, "state.json"));
        store.Save(Sample(7));

        // Written ahead and flushed, but not in place: a crash now still finds version 7, and the leftover goes.
        PreparedState ahead = store.Prepare(Sample(8));
        Assert.True(File.Exists(ahead.File));
        Assert.Equal(7UL, store.Load().WeightSets[0].Active!.Version);
        Assert.False(File.Exists(ahead.File));

        // Saving the very state it holds renames it into place.
        ahead = store.Prepare(Sample(8));
        store.Save(Sample(8), ahead);
        Assert.False(File.Exists(ahead.File));
        Assert.Equal(Sample(8).WeightSets, store.Load().WeightSets);

        // Saving another state (something changed since it was written) saves that one, and the prepared file goes.
        ahead = store.Prepare(Sample(9));
        store.Save(Sample(10), ahead, flush: false);
        store.Flush();
        Assert.False(File.Exists(ahead.File));
        Assert.Equal(10UL, store.Load().WeightSets[0].Active!.Version);
        Assert.Single(Directory.GetFiles(_folder));

        // One that is never used is deleted when disposed.
        ahead = store.Prepare(Sample(11));
        ahead.Dispose();
        Assert.False(File.Exists(ahead.File));
        Assert.Equal(10UL, store.Load().WeightSets[0].Active!.Version);
    }

    [Fact]
    public void A_damaged_state_file_is_refused_naming_it()
    {
        var store = new StateStore(Path.Combine(_folder, "state.json"));
        store.Save(Sample(3));
        byte[] bytes = File.ReadAllBytes(store.Path);
        File.WriteAllBytes(store.Path, bytes[..(bytes.Length / 2)]);
        var e = Assert.Throws<InvalidDataException>(() => store.Load());
        Assert.StartsWith($"{store.Path}: the agent's state is damaged", e.Message);

        File.WriteAllText(store.Path, "{\"format\": \"nccl-swap-state/1\", \"audit_position\": 0, \"weight_sets\": [{\"name\": \"a\", \"last_good\": 0, \"highest_published\": 0}, {\"name\": \"a\", \"last_good\": 0, \"highest_published\": 0}]}");
        Assert.Contains("'a' appears twice", Assert.Throws<InvalidDataException>(() => store.Load()).Message);
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}
