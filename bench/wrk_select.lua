-- wrk script: POST /v1/select with a different user (and real history) per request.
-- BODIES=path (one JSON request body per line, written by bench/bench_wrk.py) selects the bodies;
-- without it the script hits PATH_ONLY (e.g. /healthz) with GET. Counts 200 answers for done().
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  bodies = {}
  local path = os.getenv("BODIES")
  if path ~= nil and path ~= "" then
    for line in io.lines(path) do bodies[#bodies + 1] = line end
  end
  i = id * 7919  -- threads start at different users
  ok, other = 0, 0
end

function request()
  if #bodies == 0 then
    return wrk.format("GET", os.getenv("PATH_ONLY") or "/healthz")
  end
  i = i + 1
  return wrk.format("POST", "/v1/select", {["Content-Type"] = "application/json"}, bodies[(i % #bodies) + 1])
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local n_ok, n_other = 0, 0
  for _, t in ipairs(threads) do
    n_ok = n_ok + t:get("ok")
    n_other = n_other + t:get("other")
  end
  io.write(string.format("WRK_RESULT ok=%d other=%d p50_us=%d p99_us=%d requests=%d duration_us=%d\n",
    n_ok, n_other, latency:percentile(50), latency:percentile(99), summary.requests, summary.duration))
end
