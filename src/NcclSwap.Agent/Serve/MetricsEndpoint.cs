using NcclSwap.ControlPlane;
using Prometheus;

namespace NcclSwap.Agent.Serve;

/// <summary>
/// Serves the agent's instruments (<see cref="AgentMetrics"/>) in Prometheus text format at
/// <c>http://127.0.0.1:PORT/metrics</c>, through prometheus-net: its meter adapter turns the
/// System.Diagnostics.Metrics instruments into Prometheus series (counters as <c>_total</c>, histograms with buckets)
/// and its stand-alone server needs no web framework. Bound to the loopback address only.
/// </summary>
public sealed class MetricsEndpoint : IDisposable
{
    private readonly IDisposable _adapter;
    private readonly MetricServer _server;

    public MetricsEndpoint(int port)
    {
        CollectorRegistry registry = Metrics.NewCustomRegistry();
        _adapter = MeterAdapter.StartListening(new MeterAdapterOptions
        {
            Registry = registry,
            MetricFactory = Metrics.WithCustomRegistry(registry),
            InstrumentFilterPredicate = instrument => instrument.Meter.Name == AgentMetrics.MeterName,
        });
        _server = new MetricServer("127.0.0.1", port, "metrics/", registry);
        _server.Start();
        Port = port;
    }

    public int Port { get; }

    public void Dispose()
    {
        _server.Dispose();
        _adapter.Dispose();
    }
}
