namespace NcclSwap.Testing;

/// <summary>Parts of one test that must run at once (the ranks or members of a group), each on a thread of its own.</summary>
internal static class Threads
{
    /// <summary>
    /// Runs <paramref name="body"/>(0..count-1) on as many threads, all started before any is awaited (pool threads may
    /// come late, past a short deadline), and returns what each threw, by index (null where it returned).
    /// </summary>
    public static Exception?[] Run(int count, Action<int> body)
    {
        var failures = new Exception?[count];
        var threads = Enumerable.Range(0, count).Select(i => new Thread(() =>
        {
            try
            {
                body(i);
            }
            catch (Exception e)
            {
                failures[i] = e;
            }
        }) { IsBackground = true }).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        return failures;
    }
}
