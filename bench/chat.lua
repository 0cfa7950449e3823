-- wrk script: POST /api/chat with every connection on a session of its own.
-- Each thread owns BENCH_SESSIONS / threads session ids in a free list; a request takes one,
-- its response gives it back, so no two requests of a run share a session at once (64 clients
-- over 64 sessions means one client per session, as the benchmark intends).
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local prefix = os.getenv("BENCH_PREFIX") or "w"
  local total = tonumber(os.getenv("BENCH_SESSIONS") or "64")
  local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
  free = {}
  for i = tid, total - 1, nthreads do
    table.insert(free, prefix .. "-" .. i)
  end
  spare = 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local sid = table.remove(free)
  if sid == nil then
    spare = spare + 1  -- more connections than sessions: should not happen with c <= sessions
    sid = "spare-" .. tid .. "-" .. spare
  end
  return wrk.format(nil, "/api/chat", nil, '{"message":"hello","session_id":"' .. sid .. '"}')
end

function response(status, headers, body)
  local sid = body:match('"session_id": ?"([^"]+)"')
  if sid ~= nil then
    table.insert(free, sid)
  end
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
