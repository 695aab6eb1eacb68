-- wrk script: POST pre-built callbacks, rotating over a file of "path<TAB>body" lines.
-- Arguments (after --): the data file, and optionally a path prefix that replaces
-- "/webhooks/starmagic" (the no-op baseline takes the very same requests).
-- Run with one thread (-t1): each thread would start the rotation from the top.

local entries = {}
local position = 0

function init(args)
  local prefix = args[2]
  local webhook = "/webhooks/starmagic"
  local headers = { ["Content-Type"] = "application/json", ["User-Agent"] = "StarMagic-Callback/bench" }
  for line in io.lines(args[1]) do
    local tab = line:find("\t", 1, true)
    local path = line:sub(1, tab - 1)
    if prefix and prefix ~= "" then
      path = prefix .. path:sub(#webhook + 1)
    end
    entries[#entries + 1] = wrk.format("POST", path, headers, line:sub(tab + 1))
  end
end

function request()
  position = position + 1
  if position > #entries then
    position = 1
  end
  return entries[position]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nBENCH_JSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "latency_us": {"p50": %d, "p90": %d, ' ..
    '"p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
