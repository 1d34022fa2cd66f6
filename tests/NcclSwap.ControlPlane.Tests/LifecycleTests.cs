using System.Text.RegularExpressions;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.Testing;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>The version life cycle with a publisher and consumers in processes of their own, on the host backend.</summary>
public sealed partial class LifecycleTests
{
    private static readonly SyntheticModel Model = SyntheticModel.Tiny;

    private static List<ulong> Switches(PeerProcess consumer) =>
        SwitchPattern().Matches(consumer.Output).Select(m => ulong.Parse(m.Groups[1].Value)).ToList();

    private static string Summary(PeerProcess consumer) => consumer.WaitForLine("summary ", TimeSpan.FromSeconds(30));

    private static string Stop(PeerProcess consumer)
    {
        consumer.Process.StandardInput.WriteLine("stop");
        string summary = Summary(consumer);
        Assert.True(consumer.WaitForExit(TimeSpan.FromSeconds(30)) == 0, $"{consumer}");
        return summary;
    }

    [Fact]
    public async Task A_thousand_back_to_back_versions_reach_every_consumer_untorn_and_every_acknowledgement_is_counted()
    {
        const ulong last = 1000;
        await using TestAgent agent = TestAgent.Start(UpdatePolicy.Queue);
        using PeerProcess flip = agent.Consumer("llama", Model, ConsumerMode.Flip, until: last);
        using PeerProcess copyIn = agent.Consumer("llama", Model, ConsumerMode.CopyIn, until: last);
        using PeerProcess publisher = agent.Publisher("llama", Model, 1, last, wait: false, paceMilliseconds: 0);

        Assert.Equal(0, publisher.WaitForExit(TimeSpan.FromMinutes(5)));
        flip.WaitForLine("reached", TimeSpan.FromMinutes(2));
        copyIn.WaitForLine("reached", TimeSpan.FromMinutes(2));

        // Every version was activated, in order (queue policy). The flip consumer switched to newer versions only
        // (it may skip one that was active only between two of its steps), and the agent counted every switch's
        // acknowledgement: the next version can only go into a slot once the agent knows nobody reads it.
        IReadOnlyList<UpdateOutcome> history = agent.Core!.Versions.History("llama");
        Assert.Equal(Enumerable.Range(1, (int)last).Select(v => (ulong)v), history.Select(o => o.Version));
        Assert.All(history, o => Assert.Equal(UpdateResult.Activated, o.Result));
        List<ulong> flipped = Switches(flip);
        Assert.Equal(flipped.Order(), flipped);
        Assert.Equal(flipped.Distinct(), flipped);
        Assert.Equal(last, flipped[^1]);
        // Two activations in a row use both slots, so a third waits for an acknowledgement: at least every other version.
        Assert.True(flipped.Count >= (int)last / 2, $"the flip consumer switched only {flipped.Count} times");
        long Acknowledged() => agent.Core.Versions.Consumers("llama").Single(c => c.Mode == ConsumerMode.Flip).Acknowledgements;
        agent.WaitFor(() => Acknowledged() >= flipped.Count, TimeSpan.FromSeconds(10), "the last acknowledgement"); // it follows the switch by a moment
        Assert.Equal(flipped.Count, Acknowledged());
        Assert.Equal(2, agent.Core.Versions.Consumers("llama").Count);
        Assert.Equal(VersionEntry.PackState(last, (int)((last - 1) % 2)), agent.Core.Table.ReadState(0));

        // The copy-in consumer took versions at its own pace, always newer, ending on the last.
        List<ulong> taken = Switches(copyIn);
        Assert.Equal(taken.Order(), taken);
        Assert.Equal(taken.Distinct(), taken);
        Assert.Equal(last, taken[^1]);

        string flipSummary = Stop(flip), copySummary = Stop(copyIn);
        Assert.Contains("torn=0", flipSummary);
        Assert.Contains("torn=0", copySummary);
        Assert.Contains($"switches={flipped.Count}", flipSummary);
        Assert.DoesNotContain("torn ", flip.Output + copyIn.Output);
    }

    private static RegionLayout Layout => Model.Layout();

    private static bool IsSubsequence(List<ulong> part, ulong[] whole)
    {
        int at = 0;
        foreach (ulong item in part)
        {
            while (at < whole.Length && whole[at] != item)
                at++;
            if (at++ == whole.Length)
                return false;
        }
        return true;
    }

    [Fact]
    public async Task An_agent_whose_staging_files_cannot_be_mapped_says_so_at_start_and_activates_nothing_until_they_can()
    {
        // As the CUDA driver refuses to page-lock files on disk: every staging file's mapping fails.
        await using TestAgent agent = TestAgent.Start(unmappable: "staging");
        agent.WaitForLog($"staging directory '{agent.StagingDirectory}' cannot hold staging files");
        agent.WaitForLog("set NCCL_SWAP_Agent__StagingDirectory to a directory on tmpfs");
        Assert.Empty(Directory.EnumerateFileSystemEntries(agent.StagingDirectory)); // the probe's file is gone again
        using var copyIn = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.CopyIn);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);

        PublishResult refused = Served.Publish(publisher, 1);
        Assert.False(refused.Ok, $"{refused}");
        Assert.Contains("CUDA_ERROR_INVALID_VALUE", refused.Detail);
        copyIn.Step();
        Assert.Equal(0UL, copyIn.Version);
        Assert.Equal(0UL, agent.Core!.Table.ReadEntry(0).LastGood);

        agent.Backend!.RefuseMapHost(null); // the directory fixed: the next version goes through
        Assert.True(Served.Publish(publisher, 2).Ok);
        Served.StepUntil(agent, copyIn, 2);
        Served.AssertHolds(copyIn, 2);
    }

    [Fact]
    public async Task Rollback_restores_the_previous_bytes_exactly_and_leaves_nothing_to_roll_back_to()
    {
        await using TestAgent agent = TestAgent.Start();
        using var flip = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.Flip);
        using var copyIn = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.CopyIn);
        using PeerProcess reader = agent.Consumer("llama", Model, ConsumerMode.Flip);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        using var operatorClient = ChannelClient.Connect(agent.SocketPath, Role.Operator, "llama");

        Assert.Contains("no last good version", ChannelClient.Detail(operatorClient.Call(operatorClient.NewRequest(RequestKind.Rollback), TimeSpan.FromSeconds(10))));
        Assert.True(Served.Publish(publisher, 1).Ok);
        Served.StepUntil(agent, flip, 1);
        Assert.True(Served.Publish(publisher, 2).Ok);
        Served.StepUntil(agent, flip, 2);
        Served.StepUntil(agent, copyIn, 2);
        Served.AssertHolds(flip, 2);
        Served.AssertHolds(copyIn, 2);
        Assert.Equal(1UL, agent.Core!.Table.ReadEntry(0).LastGood);

        Response rollback = operatorClient.Call(operatorClient.NewRequest(RequestKind.Rollback), TimeSpan.FromSeconds(30));
        Assert.Equal(Status.Ok, rollback.Status);
        Assert.Equal(VersionEntry.PackState(1, 0), rollback.Version); // version 1 again, in the slot version 2 did not use
        Served.StepUntil(agent, flip, 1);
        Served.StepUntil(agent, copyIn, 1);
        Served.AssertHolds(flip, 1);
        Served.AssertHolds(copyIn, 1);
        Assert.Equal(0UL, agent.Core.Table.ReadEntry(0).LastGood);
        UpdateOutcome outcome = agent.WaitForOutcome("llama", 1, rollback: true);
        Assert.Equal(UpdateResult.Activated, outcome.Result);

        Response again = operatorClient.Call(operatorClient.NewRequest(RequestKind.Rollback), TimeSpan.FromSeconds(10));
        Assert.Equal(Status.NotFound, again.Status);
        Assert.Contains("no last good version", ChannelClient.Detail(again));

        Assert.True(Served.Publish(publisher, 3).Ok); // publishing goes on from the highest version published
        Assert.Equal(Status.Stale, publisher.Publish(2).Status);
        Served.StepUntil(agent, flip, 3);
        Served.AssertHolds(flip, 3);
        reader.WaitForLine("switch 3 ", TimeSpan.FromSeconds(30));
        string summary = Stop(reader);
        Assert.Contains("torn=0", summary);
        // It may step past a version that was active only briefly, but it follows the table's order: 1, 2, 1, 3.
        List<ulong> followed = Switches(reader);
        Assert.Equal(3UL, followed[^1]);
        Assert.True(IsSubsequence(followed, [1, 2, 1, 3]), $"the reader switched {string.Join(", ", followed)}");
    }

    [Fact]
    public async Task With_a_host_shadow_the_last_good_version_leaves_device_staging_and_rollback_and_restart_restore_it()
    {
        await using TestAgent agent = TestAgent.Start(placement: StagingPlacement.GpuWithHostShadow);
        using var flip = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.Flip);
        using var copyIn = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.CopyIn);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        string[] Manifests() => Directory.GetFiles(agent.StagingDirectory, "*.manifest");

        Assert.True(Served.Publish(publisher, 1).Ok);
        Served.StepUntil(agent, flip, 1);
        Assert.Empty(Manifests()); // device staging leaves no files: the active version is in device memory only
        for (ulong version = 2; version <= 3; version++)
        {
            Assert.True(Served.Publish(publisher, version).Ok);
            Served.StepUntil(agent, flip, version);
            Served.StepUntil(agent, copyIn, version);
            Served.AssertHolds(flip, version);
            Served.AssertHolds(copyIn, version);
            agent.WaitForLog($"last good version {version - 1} moved to host memory");
            string manifest = Assert.Single(Manifests()); // the last good one's shadow, and nothing else
            Assert.Equal(version - 1, agent.Core!.Table.ReadEntry(0).LastGood);
            Assert.True(File.Exists(manifest[..^".manifest".Length]));
        }
        Assert.Contains("GPU, last good host", StatusDetail(agent));

        using (var operatorClient = ChannelClient.Connect(agent.SocketPath, Role.Operator, "llama"))
            Assert.Equal(Status.Ok, operatorClient.Call(operatorClient.NewRequest(RequestKind.Rollback), TimeSpan.FromSeconds(30)).Status);
        Served.StepUntil(agent, flip, 2);
        Served.StepUntil(agent, copyIn, 2);
        Served.AssertHolds(flip, 2); // from the shadow, byte for byte
        Served.AssertHolds(copyIn, 2);

        // The active version is now the shadow's file, so a restart finds it, and a new consumer gets it.
        await agent.StopAsync();
        agent.Restart();
        agent.WaitForLog("recovered active version 2");
        using var late = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.CopyIn);
        Served.StepUntil(agent, late, 2);
        Served.AssertHolds(late, 2);
    }

    private static string StatusDetail(TestAgent agent)
    {
        using var client = ChannelClient.Connect(agent.SocketPath, Role.Operator, "llama");
        return ChannelClient.Detail(client.Call(client.NewRequest(RequestKind.Status), TimeSpan.FromSeconds(10)));
    }

    [Fact]
    public async Task Bytes_spoiled_on_their_way_into_staging_are_caught_and_never_activated()
    {
        // Without flip consumers, a version reaches consumers only through staging.
        await using TestAgent agent = TestAgent.Start();
        using var copyIn = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.CopyIn);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        Assert.True(Served.Publish(publisher, 1).Ok);
        Served.StepUntil(agent, copyIn, 1);
        ulong before = agent.Core!.Table.ReadState(0);

        agent.Backend!.CorruptCopiesInto("staging");
        PublishResult spoiled = Served.Publish(publisher, 2);
        Assert.Equal(Status.Corrupt, spoiled.Status);
        Assert.Contains("staged bytes of tensor", agent.WaitForOutcome("llama", 2).Detail);
        Assert.Equal(1, agent.Backend.Corrupted);
        Assert.Equal(UpdateResult.Failed, agent.Outcome("llama", 2)!.Result);
        Assert.Equal(before, agent.Core.Table.ReadState(0));
        AssertNothingWrittenAhead(agent);
        Assert.False(copyIn.Step());
        Served.AssertHolds(copyIn, 1);

        Assert.True(Served.Publish(publisher, 3).Ok);
        Served.StepUntil(agent, copyIn, 3);
        Served.AssertHolds(copyIn, 3);
    }

    [Fact]
    public async Task With_flip_consumers_a_version_goes_straight_to_their_slots_and_a_spoiled_staged_copy_is_never_served()
    {
        await using TestAgent agent = TestAgent.Start();
        using var flip = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.Flip);
        using var copyIn = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.CopyIn);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        Assert.True(Served.Publish(publisher, 1).Ok);
        Served.StepUntil(agent, flip, 1);
        Served.StepUntil(agent, copyIn, 1);
        UpdateOutcome first = agent.WaitForOutcome("llama", 1);
        Assert.Equal(1, first.Consumers);
        Assert.True(first.Snapshot > TimeSpan.Zero && first.Stage > TimeSpan.Zero);

        // The staged copy (made from the flip consumer's checked slot after activation) is spoiled: the flip
        // consumer serves the version from its slot, but no copy-in consumer ever gets the spoiled bytes.
        agent.Backend!.CorruptCopiesInto("staging");
        Assert.True(Served.Publish(publisher, 2).Ok);
        Served.StepUntil(agent, flip, 2);
        Served.AssertHolds(flip, 2);
        agent.WaitForLog("the staged copy of version 2 could not be made");
        Assert.False(copyIn.Step());
        Served.AssertHolds(copyIn, 1);
        Assert.Equal(1, agent.Backend.Corrupted);
        using (var operatorClient = ChannelClient.Connect(agent.SocketPath, Role.Operator, "llama"))
            Assert.Equal(Status.Ok, operatorClient.Call(operatorClient.NewRequest(RequestKind.Rollback), TimeSpan.FromSeconds(30)).Status);
        Served.StepUntil(agent, flip, 1); // the last good version's staged copy was good
        Served.StepUntil(agent, copyIn, 1);
        Served.AssertHolds(flip, 1);

        Assert.True(Served.Publish(publisher, 3).Ok);
        Served.StepUntil(agent, flip, 3);
        Served.StepUntil(agent, copyIn, 3);
        Served.AssertHolds(flip, 3);
        Served.AssertHolds(copyIn, 3);
    }

    [Fact]
    public async Task A_tensor_spoiled_once_on_its_way_to_a_consumer_is_sent_again_and_the_version_activates_intact()
    {
        await using TestAgent agent = TestAgent.Start();
        using var flip = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.Flip);
        using var copyIn = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.CopyIn);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        Assert.True(Served.Publish(publisher, 1).Ok);
        Served.StepUntil(agent, flip, 1);

        agent.Backend!.CorruptCopiesInto("slot1");
        Assert.True(Served.Publish(publisher, 2).Ok);
        UpdateOutcome outcome = agent.WaitForOutcome("llama", 2);
        Assert.Equal(UpdateResult.Activated, outcome.Result);
        Assert.Equal(1, outcome.Resent);
        Served.StepUntil(agent, flip, 2);
        Served.AssertHolds(flip, 2);

        agent.Backend.CorruptCopiesInto("weights"); // the copy-in consumer's buffers
        Served.StepUntil(agent, copyIn, 2);
        Served.AssertHolds(copyIn, 2);
        Assert.Equal(2, agent.Backend.Corrupted);
        Assert.Contains(agent.Log.Lines, l => l.Contains("'weights' do not match their digests", StringComparison.Ordinal));
    }

    [Fact]
    public async Task A_consumer_whose_copy_stays_wrong_fails_the_version_and_every_consumer_keeps_the_last_good_one()
    {
        await using TestAgent agent = TestAgent.Start();
        using var flip = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.Flip);
        using var other = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.Flip);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        Assert.True(Served.Publish(publisher, 1).Ok);
        Served.StepUntil(agent, flip, 1);
        Served.StepUntil(agent, other, 1);

        agent.Backend!.CorruptCopiesInto("slot1", count: 1000);
        PublishResult failed = Served.Publish(publisher, 2);
        Assert.Equal(Status.Corrupt, failed.Status);
        UpdateOutcome outcome = agent.WaitForOutcome("llama", 2);
        Assert.Equal(UpdateResult.Failed, outcome.Result);
        Assert.Matches("region 'slot1': tensor '.+' does not match its digest after 2 re-send", outcome.Detail);
        Assert.Equal(VersionEntry.PackState(1, 0), agent.Core!.Table.ReadState(0));
        AssertNothingWrittenAhead(agent);
        Assert.False(flip.Step());
        Assert.False(other.Step());
        Served.AssertHolds(flip, 1);
        Served.AssertHolds(other, 1);

        agent.Backend.Heal();
        Assert.True(Served.Publish(publisher, 3).Ok);
        Served.StepUntil(agent, flip, 3);
        Served.StepUntil(agent, other, 3);
        Served.AssertHolds(flip, 3);
        Served.AssertHolds(other, 3);
    }

    /// <summary>
    /// A failed update leaves no state written ahead for its activation beside the state file (it is deleted as
    /// soon as its write ends), and the state file still parses.
    /// </summary>
    private static void AssertNothingWrittenAhead(TestAgent agent)
    {
        string statePath = agent.Core!.Options.StatePath;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        string[] left;
        while ((left = Directory.GetFiles(Path.GetDirectoryName(statePath)!, Path.GetFileName(statePath) + ".partial*")).Length > 0
            && clock.Elapsed < TimeSpan.FromSeconds(10))
            Thread.Sleep(10);
        Assert.Empty(left);
        Assert.NotEmpty(NcclSwap.ControlPlane.State.AgentState.Parse(File.ReadAllBytes(statePath), statePath).WeightSets);
    }

    /// <summary>The inodes of the slots a consumer process maps (the fifth field of its /proc/PID/maps lines).</summary>
    private static HashSet<string> SlotInodes(PeerProcess consumer) =>
        File.ReadAllLines($"/proc/{consumer.Process.Id}/maps").Where(l => l.Contains("memfd:nccl-swap-slot", StringComparison.Ordinal))
            .Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[4]).ToHashSet();

    /// <summary>How many of those this process (the agent) maps now.</summary>
    private static int Mapped(HashSet<string> inodes) =>
        File.ReadAllLines("/proc/self/maps").Count(l => l.Contains("memfd:nccl-swap-slot", StringComparison.Ordinal) && inodes.Contains(l.Split(' ', StringSplitOptions.RemoveEmptyEntries)[4]));

    private static void Signal(PeerProcess peer, string signal)
    {
        using var kill = System.Diagnostics.Process.Start("kill", [$"-{signal}", $"{peer.Process.Id}"]);
        kill.WaitForExit();
    }

    [Fact]
    public async Task A_consumer_killed_while_an_update_waits_for_it_does_not_hold_up_that_update_or_the_next()
    {
        await using TestAgent agent = TestAgent.Start(ackTimeout: TimeSpan.FromSeconds(60));
        using PeerProcess survivor = agent.Consumer("llama", Model, ConsumerMode.Flip);
        using PeerProcess victim = agent.Consumer("llama", Model, ConsumerMode.Flip);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        Assert.True(Served.Publish(publisher, 1).Ok);
        survivor.WaitForLine("switch 1 ", TimeSpan.FromSeconds(30));
        victim.WaitForLine("switch 1 ", TimeSpan.FromSeconds(30));
        agent.WaitFor(() => agent.Core!.Versions.Consumers("llama").All(c => c.Serving == VersionEntry.PackState(1, 0)), TimeSpan.FromSeconds(10), "both acknowledgements of version 1");

        Signal(victim, "STOP"); // it serves version 1 from slot 0 and will not move on
        Assert.True(Served.Publish(publisher, 2).Ok); // slot 1 was free in both: no waiting
        Task<PublishResult> third = Task.Run(() => Served.Publish(publisher, 3)); // slot 0 again: the victim still reads it
        agent.WaitFor(() => agent.Outcome("llama", 3) is { Result: UpdateResult.Staging }, TimeSpan.FromSeconds(10), "the update to version 3 starting");
        await Task.Delay(500, TestContext.Current.CancellationToken);
        Assert.Equal(UpdateResult.Staging, agent.Outcome("llama", 3)!.Result); // held up by the stopped consumer

        HashSet<string> victimSlots = SlotInodes(victim);
        Assert.Equal(2, victimSlots.Count);
        Assert.Equal(2, Mapped(victimSlots)); // the agent maps the victim's two slots
        var clock = System.Diagnostics.Stopwatch.StartNew();
        victim.Process.Kill(); // SIGKILL: its session closes, it no longer counts
        Assert.True((await third.WaitAsync(TimeSpan.FromSeconds(20), TestContext.Current.CancellationToken)).Ok);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"version 3 took {clock.Elapsed.TotalSeconds:0.0} s after the kill");
        UpdateOutcome outcome = agent.Outcome("llama", 3)!;
        Assert.Equal(UpdateResult.Activated, outcome.Result);
        Assert.Equal(1, outcome.Consumers);
        Assert.Empty(outcome.Evicted); // it left; nobody had to end it
        Assert.Single(agent.Core!.Versions.Consumers("llama"));
        agent.WaitFor(() => Mapped(victimSlots) == 0, TimeSpan.FromSeconds(10), "the agent unmapping the killed consumer's slots"); // its memory is let go

        Assert.True(Served.Publish(publisher, 4).Ok);
        survivor.WaitForLine("switch 4 ", TimeSpan.FromSeconds(30));
        Assert.Contains("torn=0", Stop(survivor));
        Assert.Equal([1UL, 2, 3, 4], Switches(survivor));
    }

    [Fact]
    public async Task A_stalled_consumer_loses_its_lease_at_the_deadline_and_reconnects_when_it_wakes()
    {
        await using TestAgent agent = TestAgent.Start(ackTimeout: TimeSpan.FromSeconds(1));
        using PeerProcess healthy = agent.Consumer("llama", Model, ConsumerMode.Flip);
        using PeerProcess stalled = agent.Consumer("llama", Model, ConsumerMode.Flip);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        Assert.True(Served.Publish(publisher, 1).Ok);
        stalled.WaitForLine("switch 1 ", TimeSpan.FromSeconds(30));
        agent.WaitFor(() => agent.Core!.Versions.Consumers("llama").All(c => c.Serving != 0), TimeSpan.FromSeconds(10), "both acknowledgements of version 1");

        Signal(stalled, "STOP");
        Assert.True(Served.Publish(publisher, 2).Ok);
        Assert.True(Served.Publish(publisher, 3).Ok); // waits for the stalled one's acknowledgement until the deadline, then ends it
        UpdateOutcome third = agent.Outcome("llama", 3)!;
        Assert.Equal(UpdateResult.Activated, third.Result);
        Assert.Single(third.Evicted);
        Assert.InRange(third.AckWait, TimeSpan.FromSeconds(0.9), TimeSpan.FromSeconds(10));
        Assert.Contains(agent.Log.Lines, l => l.Contains("no acknowledgement", StringComparison.Ordinal));

        Signal(stalled, "CONT"); // it finds its session ended, keeps serving what it has, reconnects and catches up
        Assert.True(Served.Publish(publisher, 4).Ok);
        stalled.WaitForLine("switch 4 ", TimeSpan.FromSeconds(30));
        healthy.WaitForLine("switch 4 ", TimeSpan.FromSeconds(30));
        string summary = Stop(stalled);
        Assert.Contains("torn=0", summary);
        Assert.Contains("sessions=2", summary);
        Assert.Contains("torn=0", Stop(healthy));
    }

    [Fact]
    public async Task Bad_requests_and_out_of_role_requests_are_refused_with_the_reason_and_change_nothing()
    {
        await using TestAgent agent = TestAgent.Start();
        using var flip = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.Flip);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        using var bare = ChannelClient.Connect(agent.SocketPath, Role.Publisher, "llama"); // these two register nothing
        using var bareConsumer = ChannelClient.Connect(agent.SocketPath, Role.Consumer, "llama");
        Assert.True(Served.Publish(publisher, 5).Ok);
        Served.StepUntil(agent, flip, 5);
        VersionTable table = agent.Core!.Table;
        ulong state = table.ReadState(0);
        int updates = agent.Core.Versions.History("llama").Count;

        void Refused(ChannelClient client, Request request, int status, string reason)
        {
            Response response = client.Call(request, TimeSpan.FromSeconds(10));
            Assert.Equal(status, response.Status);
            Assert.Contains(reason, ChannelClient.Detail(response));
        }

        ChannelClient p = publisher.Channel;
        Refused(p, p.NewRequest(RequestKind.Publish, 5), Status.Stale, "version 5 is not newer than 5");
        Refused(p, p.NewRequest(RequestKind.Publish, 4), Status.Stale, "not newer");
        Refused(p, p.NewRequest(RequestKind.Publish, 0), Status.Invalid, "version 0 is not in [1, 2^56)");
        Refused(p, p.NewRequest(RequestKind.Publish, 6) with { WeightSet = 3 }, Status.Invalid, "weight_set 3 is not this session's row 0 ('llama')");
        Refused(p, p.NewRequest(RequestKind.Publish, 6) with { Magic = 0x12345678 }, Status.Invalid, "request magic 0x12345678");
        Refused(p, p.NewRequest(RequestKind.Publish, 6) with { Kind = 99 }, Status.Invalid, "request kind 99 is unknown");
        Refused(p, p.NewRequest(RequestKind.Publish, 6) with { PayloadBytes = 500 }, Status.Invalid, "exceeds 96");
        Refused(p, p.NewRequest(RequestKind.Rollback), Status.NotPermitted, "a publisher may not send rollback");
        Refused(p, p.NewRequest(RequestKind.Ack, state), Status.NotPermitted, "a publisher may not send ack");
        Refused(bare, bare.NewRequest(RequestKind.Publish, 6), Status.Invalid, "registered no tensors");

        ChannelClient c = ConsumerChannel(flip);
        Refused(c, c.NewRequest(RequestKind.Publish, 6), Status.NotPermitted, "a consumer may not send publish");
        Refused(c, c.NewRequest(RequestKind.CopyIn), Status.Invalid, "copy-in is for consumers registered in copy-in mode");
        Refused(c, c.NewRequest(RequestKind.Ack, VersionEntry.PackState(5, 1)), Status.Invalid, "version 5 (slot 1), which was never active");
        Refused(c, c.NewRequest(RequestKind.Ack, VersionEntry.PackState(9, 0)), Status.Invalid, "never active");
        Refused(bareConsumer, bareConsumer.NewRequest(RequestKind.Ack, state), Status.Invalid, "consumers registered in flip mode");

        Assert.Equal(state, table.ReadState(0));
        Assert.Equal(updates, agent.Core.Versions.History("llama").Count);
        Assert.Equal(state, agent.Core.Versions.Consumers("llama").Single().Serving);
        Assert.False(flip.Step());
        Served.AssertHolds(flip, 5);
        Assert.True(Served.Publish(publisher, 6).Ok); // the sessions still work
        Served.StepUntil(agent, flip, 6);
    }

    private static ChannelClient ConsumerChannel(ConsumerClient consumer) =>
        (ChannelClient)typeof(ConsumerClient).GetField("_channel", System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Instance)!.GetValue(consumer)!;

    [Fact]
    public async Task Registrations_that_break_a_rule_are_refused_naming_it_and_leave_nothing_behind()
    {
        await using TestAgent agent = TestAgent.Start();
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        Assert.True(Served.Publish(publisher, 1).Ok);
        ulong state = agent.Core!.Table.ReadState(0);

        string Refusal(RegionLayout layout, string? mode, params WeightRegion[] regions) =>
            Assert.Throws<ChannelRefusedException>(() => ChannelClient.Connect(agent.SocketPath, Role.Consumer, "llama", null,
                new RegistrationRequest(layout, regions, mode))).Message;

        var shapes = Model.Tensors().ToList();
        shapes[3] = (shapes[3].Name, shapes[3].Dtype, [shapes[3].Shape[0] + 1, .. shapes[3].Shape[1..]]);
        RegionLayout reshaped = RegionLayout.Packed(shapes);
        using (WeightRegion a = WeightRegion.Create("slot0", reshaped), b = WeightRegion.Create("slot1", reshaped))
            Assert.Contains($"do not match weight set 'llama': tensor '{shapes[3].Name}' has shape", Refusal(reshaped, "flip", a, b));

        RegionLayout fewer = RegionLayout.Packed(Model.Tensors().Skip(1));
        using (WeightRegion a = WeightRegion.Create("slot0", fewer), b = WeightRegion.Create("slot1", fewer))
            Assert.Contains($"tensor '{Model.Tensors()[0].Name}' is missing", Refusal(fewer, "flip", a, b));

        using (WeightRegion only = WeightRegion.Create("slot0", Layout))
            Assert.Contains("a flip consumer registers two regions (slots A and B), not 1", Refusal(Layout, "flip", only));
        using (WeightRegion only = WeightRegion.Create("slot0", Layout))
            Assert.Contains("mode 'swap' is not flip or copy-in", Refusal(Layout, "swap", only));

        RegionLayout small = RegionLayout.Packed([("w", "F32", [16])]);
        RegionLayout beyond = RegionLayout.Create([("w", "F32", [16], 1 << 20)]); // reaches past the region's page
        using (WeightRegion tiny = WeightRegion.Create("tensors", small))
        {
            var e = Assert.Throws<ChannelRefusedException>(() => ChannelClient.Connect(agent.SocketPath, Role.Publisher, "other", null, new RegistrationRequest(beyond, [tiny])));
            Assert.Contains("region 'tensors' holds 4096 bytes, but its tensors reach byte 1048640", e.Message);
        }

        // A region that could be cut short under the agent (not sealed) is refused; so is a second publisher.
        using (SharedRegion unsealed = SharedRegion.CreateAnonymous("unsealed", 4096))
        using (var socket = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified))
        {
            socket.Connect(new System.Net.Sockets.UnixDomainSocketEndPoint(agent.SocketPath));
            string hello = "{\"role\":\"publisher\",\"weight_set\":\"other\",\"tensors\":[{\"name\":\"w\",\"dtype\":\"F32\",\"shape\":[16],\"offset\":0}],\"regions\":[\"tensors\"]}\n";
            FdPassing.Send(socket, System.Text.Encoding.UTF8.GetBytes(hello), [unsealed.Descriptor]);
            byte[] reply = new byte[4096];
            int n = socket.Receive(reply);
            Assert.Contains("not a memfd sealed against shrinking", System.Text.Encoding.UTF8.GetString(reply, 0, n));
        }
        Assert.Contains("already has a publisher", Assert.Throws<ChannelRefusedException>(() => PublisherClient.Connect(agent.SocketPath, "llama", Layout)).Message);
        Assert.Contains("tensor 'w' appears twice", Assert.Throws<LayoutException>(() => RegionLayout.Create([("w", "F32", [1], 0), ("w", "F32", [1], 64)])).Message);

        Assert.Equal(state, agent.Core.Table.ReadState(0));
        Assert.Empty(agent.Core.Versions.Consumers("llama"));
        Assert.True(Served.Publish(publisher, 2).Ok); // the registered publisher is undisturbed
    }

    [Fact]
    public async Task GPU_regions_are_checked_and_an_agent_on_the_host_backend_refuses_them_saying_why()
    {
        await using TestAgent agent = TestAgent.Start();
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        Assert.True(Served.Publish(publisher, 1).Ok);
        ulong state = agent.Core!.Table.ReadState(0);

        string tensors = "[{\"name\":\"w\",\"dtype\":\"F32\",\"shape\":[16],\"offset\":0},{\"name\":\"v\",\"dtype\":\"F32\",\"shape\":[16],\"offset\":4096}]";
        string handle = Convert.ToHexString(TestData.Random(64, TestData.NewSeed()));
        string Gpu(string name, params (long Bytes, long At)[] segments) =>
            $"{{\"name\":\"{name}\",\"cuda\":[{string.Join(",", segments.Select(s => $"{{\"handle\":\"{handle}\",\"offset\":0,\"bytes\":{s.Bytes},\"at\":{s.At}}}"))}]}}";
        string Refusal(string role, string regions, string mode, int gates)
        {
            var pages = Enumerable.Range(0, gates).Select(_ => SharedRegion.CreateAnonymous("gate", 4096, @sealed: true)).ToList();
            try
            {
                using var socket = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
                socket.Connect(new System.Net.Sockets.UnixDomainSocketEndPoint(agent.SocketPath));
                string hello = $"{{\"role\":\"{role}\",\"weight_set\":\"gpu\",\"tensors\":{tensors},\"regions\":[{regions}],\"mode\":\"{mode}\"}}\n";
                FdPassing.Send(socket, System.Text.Encoding.UTF8.GetBytes(hello), pages.Select(p => p.Descriptor).ToArray());
                byte[] reply = new byte[4096];
                int n = socket.Receive(reply);
                using var answer = System.Text.Json.JsonDocument.Parse(reply.AsMemory(0, n));
                Assert.False(answer.RootElement.GetProperty("ok").GetBoolean());
                return answer.RootElement.GetProperty("error").GetString()!;
            }
            finally
            {
                foreach (SharedRegion page in pages)
                    page.Dispose();
            }
        }

        string slot0 = Gpu("slot0", (8192, 0)), slot1 = Gpu("slot1", (4096, 0), (4096, 4096 + 256));
        Assert.Contains("a consumer with GPU regions also sends its gate, last: a memfd named 'gate'", Refusal("consumer", $"{slot0},{slot1}", "flip", 0));
        Assert.Contains("GPU memory (a CUDA IPC handle), which the host backend cannot open", Refusal("consumer", $"{slot0},{slot1},\"gate\"", "flip", 1));
        Assert.Contains("GPU memory (a CUDA IPC handle), which the host backend cannot open", Refusal("publisher", Gpu("tensors", (8192, 0)), "flip", 0));
        Assert.Contains("region 'slot1' allocation 1: at 4100 must be at least 256 bytes past the end of the one before (4096)",
            Refusal("consumer", $"{slot0},{Gpu("slot1", (4096, 0), (4096, 4100))},\"gate\"", "flip", 1));
        Assert.Contains("region 'weights' allocation 0: bytes must be positive", Refusal("consumer", $"{Gpu("weights", (0, 0))},\"gate\"", "copy-in", 1));
        Assert.Contains("region 'weights' allocation 0: handle:", Refusal("consumer", $"{Gpu("weights", (8192, 0)).Replace(handle, "xyz")},\"gate\"", "copy-in", 1));
        Assert.Contains("region 'gate' is a gate, which only a consumer with GPU regions sends", Refusal("consumer", "\"weights\",\"gate\"", "copy-in", 2));
        Assert.Contains("regions[0] must be a name (shared memory sent as a descriptor) or an object", Refusal("consumer", "17,\"gate\"", "copy-in", 1));

        Assert.Equal(state, agent.Core.Table.ReadState(0));
        Assert.Empty(agent.Core.Versions.Consumers("llama"));
        Assert.True(Served.Publish(publisher, 2).Ok);
    }

    [Fact]
    public async Task An_agent_killed_in_the_middle_of_updates_restarts_and_every_consumer_stays_on_a_good_version()
    {
        var model = new SyntheticModel(4, 256, 688, 8192, 4, 2); // about 14 MB: an update takes tens of milliseconds here
        int seed = TestData.NewSeed();
        var random = new Random(seed);
        await using TestAgent folder = TestAgent.ForProcess();
        PeerProcess agent = folder.StartProcess(UpdatePolicy.Queue, TimeSpan.FromSeconds(30));
        var agents = new List<PeerProcess> { agent };
        try
        {
            using PeerProcess flip = folder.Consumer("llama", model, ConsumerMode.Flip);
            using PeerProcess copyIn = folder.Consumer("llama", model, ConsumerMode.CopyIn);
            using PeerProcess publisher = folder.Publisher("llama", model, 1, 8, wait: false, paceMilliseconds: -1);
            void PublishNext(ulong version)
            {
                publisher.Process.StandardInput.WriteLine();
                publisher.WaitForLine($"published {version} ", TimeSpan.FromSeconds(60));
            }

            PublishNext(1);
            flip.WaitForLine("switch 1 ", TimeSpan.FromSeconds(30));
            copyIn.WaitForLine("switch 1 ", TimeSpan.FromSeconds(30));
            for (ulong version = 2; version <= 6; version++)
            {
                PublishNext(version); // the snapshot is taken: staging, verification and activation follow
                Thread.Sleep(random.Next(0, 700)); // from the snapshot to well after activation (an update takes a few hundred ms here)
                agent.Process.Kill(); // SIGKILL, somewhere in the update
                agent.Process.WaitForExit();
                agent = folder.StartProcess(UpdatePolicy.Queue, TimeSpan.FromSeconds(30));
                agents.Add(agent);
            }
            PublishNext(7);
            PublishNext(8);
            flip.WaitForLine("switch 8 ", TimeSpan.FromSeconds(60));
            copyIn.WaitForLine("switch 8 ", TimeSpan.FromSeconds(60));

            string flipSummary = Stop(flip), copySummary = Stop(copyIn);
            Assert.True(flipSummary.Contains("torn=0") && copySummary.Contains("torn=0"), $"seed {seed}: {flipSummary} | {copySummary}");
            Assert.DoesNotContain("torn ", flip.Output + copyIn.Output);
            Assert.Matches("sessions=[2-9]", flipSummary); // it reconnected to the restarted agents
            List<ulong> flipped = Switches(flip);
            Assert.Equal(flipped.Order(), flipped); // never back to an older version
            Assert.Equal(8UL, flipped[^1]);
            Assert.Contains(agents.Skip(1).SelectMany(a => a.Output.Split('\n')), l => l.Contains("recovered active version", StringComparison.Ordinal));
        }
        finally
        {
            foreach (PeerProcess a in agents)
                a.Dispose();
        }
    }

    [Fact]
    public async Task Under_supersede_a_version_published_while_another_waits_replaces_it_and_versions_never_interleave()
    {
        await using TestAgent agent = TestAgent.Start(UpdatePolicy.Supersede, ackTimeout: TimeSpan.FromSeconds(60));
        using var flip = ConsumerClient.Connect(agent.SocketPath, "llama", Layout, ConsumerMode.Flip);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", Layout);
        var order = new List<(ulong Version, UpdateResult Result)>();
        agent.Core!.Versions.Updated += o => { lock (order) order.Add((o.Version, o.Result)); };
        // The consumer does not step yet: versions 1 and 2 fill both its slots, so version 3's update waits for it,
        // and what is published meanwhile queues behind (4), to be replaced by a newer one (5, then 6).
        for (ulong version = 1; version <= 6; version++)
        {
            SyntheticModel.Fill(version, publisher.Tensors.Layout, publisher.Tensors.Pointer);
            Assert.True(publisher.Publish(version, wait: version <= 2).Ok); // 3 to 6 return at the snapshot; the update runs behind
            if (version == 3)
                agent.WaitFor(() => agent.Outcome("llama", 3) is { Result: UpdateResult.Staging }, TimeSpan.FromSeconds(30), "version 3's update starting");
        }
        agent.WaitFor(() => { flip.Step(); return agent.Outcome("llama", 6) is { IsFinal: true }; }, TimeSpan.FromSeconds(60), "the end of version 6's update");
        Served.StepUntil(agent, flip, 6);
        Served.AssertHolds(flip, 6);

        lock (order)
        {
            Assert.Equal(UpdateResult.Activated, order.Single(o => o.Version == 1).Result);
            Assert.Equal(UpdateResult.Activated, order.Single(o => o.Version == 6).Result);
            Assert.Equal([(4UL, UpdateResult.Superseded), (5UL, UpdateResult.Superseded)], order.Where(o => o.Result == UpdateResult.Superseded));
            Assert.Equal([1UL, 2, 3, 6], order.Where(o => o.Result == UpdateResult.Activated).Select(o => o.Version));
            var activated = order.Where(o => o.Result == UpdateResult.Activated).Select(o => o.Version).ToList();
            Assert.Equal(activated.Order(), activated); // one update at a time, in order
        }
        UpdateOutcome superseded = agent.Core.Versions.History("llama").First(o => o.Result == UpdateResult.Superseded);
        Assert.Equal("superseded by version 5", superseded.Detail);
        Assert.Equal(Status.Canceled, superseded.Status);
        Assert.Equal(TimeSpan.Zero, superseded.Stage); // never staged to a consumer
    }

    [Fact]
    public async Task Stopping_the_agent_mid_update_activates_nothing_and_the_next_start_recovers_the_last_good_state()
    {
        var model = new SyntheticModel(4, 256, 688, 8192, 4, 2);
        TestAgent agent = TestAgent.Start(ackTimeout: TimeSpan.FromSeconds(60));
        try
        {
            using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", model.Layout());
            using var flip = ConsumerClient.Connect(agent.SocketPath, "llama", model.Layout(), ConsumerMode.Flip);
            SyntheticModel.Fill(1, publisher.Tensors.Layout, publisher.Tensors.Pointer);
            Assert.True(publisher.Publish(1, wait: true).Ok);
            Served.StepUntil(agent, flip, 1);
            SyntheticModel.Fill(2, publisher.Tensors.Layout, publisher.Tensors.Pointer);
            Assert.True(publisher.Publish(2, wait: true).Ok);
            // The consumer does not step: version 3 must wait for it to leave slot 0, so the update is surely in flight.
            SyntheticModel.Fill(3, publisher.Tensors.Layout, publisher.Tensors.Pointer);
            Assert.True(publisher.Publish(3).Ok);
            agent.WaitFor(() => agent.Outcome("llama", 3) is { Result: UpdateResult.Staging }, TimeSpan.FromSeconds(30), "version 3's update starting");
            ulong before = agent.Core!.Table.ReadState(0);

            VersionManager stopped = agent.Core.Versions;
            await agent.StopAsync();
            UpdateOutcome abandoned = stopped.History("llama").Last();
            Assert.Equal(3UL, abandoned.Version);
            Assert.Equal(UpdateResult.Abandoned, abandoned.Result);
            Assert.Equal(0UL, abandoned.State);
            Assert.Equal(VersionEntry.PackState(2, 1), before);
            Assert.Contains(agent.Log.Lines, l => l.Contains("nccl-swap agent stopped", StringComparison.Ordinal));
            Served.AssertHolds(flip, 1); // it never stepped: still version 1, intact
            Assert.False(flip.Step()); // the table shows version 2, but without a live session the consumer stays put

            agent.Restart();
            Assert.Equal(VersionEntry.PackState(2, 1), agent.Core!.Table.ReadState(0));
            Assert.Contains(agent.Log.Lines, l => l.Contains("recovered active version 2", StringComparison.Ordinal));
            Assert.Contains(agent.Log.Lines, l => l.Contains("recovered last good version 1", StringComparison.Ordinal));
            Served.StepUntil(agent, flip, 2); // it reconnects by itself, and steps on to the active version
            Served.AssertHolds(flip, 2);
            publisher.Reconnect();
            Assert.Equal(Status.Stale, publisher.Publish(2).Status);
            // The highest version published is saved with each activation: version 3 was abandoned, so it may come again.
            SyntheticModel.Fill(3, publisher.Tensors.Layout, publisher.Tensors.Pointer);
            Assert.True(publisher.Publish(3, wait: true).Ok);
            Served.StepUntil(agent, flip, 3);
            Served.AssertHolds(flip, 3);
        }
        finally
        {
            await agent.DisposeAsync();
        }
    }

    [GeneratedRegex(@"^switch (\d+) ", RegexOptions.Multiline)]
    private static partial Regex SwitchPattern();
}
