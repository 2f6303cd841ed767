-- wrk `done` hook: prints one line "WRK_JSON {...}" with the run's totals and latency
-- percentiles (microseconds). Only `done` is defined, so wrk keeps its fast path (no per-request
-- Lua calls). Used by perf/bench.py.

done = function(summary, latency, requests)
  local e = summary.errors
  local function p(q)
    if summary.requests == 0 then return 0 end
    return latency:percentile(q)
  end
  io.write(string.format(
    'WRK_JSON {"requests":%d,"bytes":%d,"duration_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"lat_mean_us":%.1f,"lat_stdev_us":%.1f,"lat_max_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.bytes, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.max,
    p(50), p(90), p(99), p(99.9)))
end
