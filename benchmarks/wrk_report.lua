-- wrk script of the HTTP benchmarks: a safety cap on the number of responses per thread
-- (WRK_MAX_REQUESTS; the run is otherwise bounded by -d) and one machine-readable summary line.
-- When the cap is hit, wrk still divides by the full -d, so the runner flags the run as capped.
local max_requests = tonumber(os.getenv("WRK_MAX_REQUESTS") or "0")
local responses = 0

function response(status, headers, body)
  responses = responses + 1
  if max_requests > 0 and responses >= max_requests then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max))
end
