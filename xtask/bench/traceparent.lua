-- wrk script for `cargo xtask bench`: every request carries a fresh, valid W3C traceparent
-- (00-<32 hex trace-id>-<16 hex parent-id>-01, neither id all zeros), so the tracer has real
-- trace context to parse.
--
-- Script arguments (after `--` on wrk's command line), in any order:
--   close      send `Connection: close`: one new TCP connection per request
--   rate=R     pace the whole run to R requests/s in total (wrk has no rate limit of its own);
--              each thread takes R/threads, evenly spaced, through wrk's delay() hook
--   threads=N  the -t given to wrk (to split the rate between threads)
--   path=P     request path (default /)
--
-- At the end it prints one machine-readable line, parsed by xtask/src/bench.rs (latencies
-- in microseconds, measured by wrk from the request's first byte written, so without the
-- TCP handshake in `close` mode and without the pacing wait):
--   BENCH requests=N duration_us=N p50_us=N p99_us=N max_us=N connect_err=N read_err=N
--         write_err=N status_err=N timeout_err=N

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local fmt = string.format
local random = math.random

local close = false
local path = "/"
local interval_ms = nil -- per thread; nil = unpaced

-- Runs in the main Lua state once per thread, before that thread's init(): number the
-- threads so their random streams differ even when they start in the same second.
local threads_made = 0
function setup(thread)
  threads_made = threads_made + 1
  thread:set("thread_id", threads_made)
end

-- Pacing: each call reserves the thread's next send slot, `interval_ms` after the previous
-- one, and returns the wait until it. Slots left behind by late timers are caught up (sent at
-- once), but never more than CATCH_UP_MS of them: a thread that fell behind for longer (the
-- server could not keep up) does not burst. wrk takes whole milliseconds, so a request may
-- leave up to 1 ms early; the rate over the run is still exact.
local CATCH_UP_MS = 5
local last_slot = nil
local function paced_delay()
  local now = now_ms()
  local slot = now
  if last_slot then
    slot = math.max(last_slot + interval_ms, now - CATCH_UP_MS)
  end
  last_slot = slot
  local wait = slot - now
  if wait < 1 then
    return 0
  end
  return math.floor(wait)
end

function init(args)
  local threads = 1
  local rate = nil
  for _, a in ipairs(args) do
    if a == "close" then
      close = true
    elseif a:match("^rate=") then
      rate = tonumber(a:sub(6))
    elseif a:match("^threads=") then
      threads = tonumber(a:sub(9))
    elseif a:match("^path=") then
      path = a:sub(6)
    end
  end
  if rate and rate > 0 then
    interval_ms = 1000 * threads / rate
    -- wrk decides whether to call delay() at all from the first thread's state after its
    -- init(): defined only when pacing, unpaced runs pay nothing for it.
    delay = paced_delay
  end
  -- os.time() has 1 s resolution; the thread id and the monotonic clock separate threads.
  math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919 + math.floor(now_ms() % 1000003))
end

-- 16 random bits per call: LuaJIT's string.format %x is only safe up to 2^31.
local function traceparent()
  return fmt("00-%04x%04x%04x%04x%04x%04x%04x%04x-%04x%04x%04x%04x-01",
    random(1, 0xffff), random(0, 0xffff), random(0, 0xffff), random(0, 0xffff),
    random(0, 0xffff), random(0, 0xffff), random(0, 0xffff), random(0, 0xffff),
    random(1, 0xffff), random(0, 0xffff), random(0, 0xffff), random(0, 0xffff))
end

function request()
  local headers = { ["traceparent"] = traceparent() }
  if close then
    headers["Connection"] = "close"
  end
  return wrk.format("GET", path, headers)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(fmt("BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d " ..
    "connect_err=%d read_err=%d write_err=%d status_err=%d timeout_err=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
