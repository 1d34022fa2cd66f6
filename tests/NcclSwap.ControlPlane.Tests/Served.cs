using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>What consumers serve, checked as an engine would see it: stepping between steps, then every byte against the synthetic version.</summary>
internal static class Served
{
    /// <summary>Steps <paramref name="consumer"/> until it serves <paramref name="version"/>, as an engine would between steps.</summary>
    public static void StepUntil(TestAgent agent, ConsumerClient consumer, ulong version) =>
        agent.WaitFor(() => { consumer.Step(); return consumer.Version == version; }, TimeSpan.FromSeconds(30), $"a {consumer.Mode} consumer serving version {version} (it serves {consumer.Version}, {consumer.LastError})");

    /// <summary>The consumer's weights, byte for byte, against what version <paramref name="version"/> holds.</summary>
    public static void AssertHolds(ConsumerClient consumer, ulong version)
    {
        Assert.Equal(version, consumer.Version);
        foreach (TensorPlacement tensor in consumer.Layout.Tensors)
        {
            byte[] expected = new byte[tensor.Bytes];
            SyntheticModel.Fill(version, tensor.Name, expected);
            Assert.True(consumer.Weights.Tensor(tensor.Name).SequenceEqual(expected), $"tensor '{tensor.Name}' of the {consumer.Mode} consumer is not version {version}'s");
        }
    }

    /// <summary>Writes version <paramref name="version"/> of the synthetic model into the publisher's tensors and publishes it.</summary>
    public static PublishResult Publish(PublisherClient publisher, ulong version, bool wait = true)
    {
        SyntheticModel.Fill(version, publisher.Tensors.Layout, publisher.Tensors.Pointer);
        return publisher.Publish(version, wait);
    }
}
