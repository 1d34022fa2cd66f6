using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane.Versions;

/// <summary>
/// Consumers' reported counters, summed: requests, errors, a latency histogram in the buckets of
/// <see cref="ReportPayload"/> (each √2 wider than the one before) and quality scores. Thread-safe.
/// </summary>
public sealed class ServingFigures
{
    private readonly Lock _lock = new();
    private readonly long[] _latency = new long[ReportPayload.Buckets];
    private long _requests, _errors, _qualityCount;
    private double _qualitySum;

    public void Add(in ReportPayload report)
    {
        lock (_lock)
        {
            _requests += report.Requests;
            _errors += report.Errors;
            _qualityCount += report.QualityCount;
            _qualitySum += report.QualitySum;
            for (int i = 0; i < ReportPayload.Buckets; i++)
                _latency[i] += report.Latency[i];
        }
    }

    public long Requests
    {
        get
        {
            lock (_lock)
                return _requests;
        }
    }

    public long Errors
    {
        get
        {
            lock (_lock)
                return _errors;
        }
    }

    /// <summary>Errors per request, 0 with no requests.</summary>
    public double ErrorRate
    {
        get
        {
            lock (_lock)
                return _requests == 0 ? 0 : (double)_errors / _requests;
        }
    }

    /// <summary>The mean quality score, or null when none was reported.</summary>
    public double? MeanQuality
    {
        get
        {
            lock (_lock)
                return _qualityCount == 0 ? null : _qualitySum / _qualityCount;
        }
    }

    /// <summary>The upper bound (ms) of the bucket that holds the <paramref name="quantile"/>-th latency; null with no latencies.</summary>
    public double? LatencyQuantile(double quantile)
    {
        lock (_lock)
        {
            long total = _latency.Sum();
            if (total == 0)
                return null;
            long rank = (long)Math.Ceiling(quantile * total);
            long seen = 0;
            for (int i = 0; i < ReportPayload.Buckets; i++)
                if ((seen += _latency[i]) >= rank)
                    return ReportPayload.UpperMilliseconds(i);
            return double.PositiveInfinity;
        }
    }

    public double? P99 => LatencyQuantile(0.99);

    public override string ToString()
    {
        double? p99 = P99, quality = MeanQuality;
        return $"{Requests} requests, {Errors} errors ({ErrorRate:0.####}), p99 {(p99 is { } p ? $"≤{p:0.#} ms" : "n/a")}{(quality is { } q ? $", quality {q:0.###}" : "")}";
    }
}
