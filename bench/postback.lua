-- wrk script for bench/ingest.py: one realistic signed S2S postback per request.
--
-- Why a script and not `wrk -s post.lua` with a fixed body: a real advertiser sends a new
-- order id (and varying click ids, hence varying Kafka keys and partitions) every time,
-- and the durability check needs every order id to be unique. Click ids and signatures
-- come from pools built once in init() so that wrk itself (one thread on a shared box)
-- spends as little CPU per request as possible.
--
-- Usage: wrk -t1 -cC -dDs --latency -s bench/postback.lua http://HOST:PORT/postback -- TAG
-- TAG prefixes every order id (order_id=ORD-TAG-N), so runs never collide.
--
-- done() prints one machine-readable line, `WRK_JSON {...}`, with the totals, the
-- latency percentiles (microseconds) and `sent`: requests put on the wire, including those
-- still in flight when wrk stopped (their answers are never counted by wrk).

local CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
local HEX = "0123456789abcdef"
local POOL = 4096

local tag = "run"
local click_ids = {}
local sigs = {}
local headers = {
   ["Content-Type"] = "application/x-www-form-urlencoded",
   ["User-Agent"] = "acme-s2s/2.3",
}

-- A global (not local) so the main environment can read it with thread:get("counter").
counter = 0

local function random_string(alphabet, length, first_max)
   local out = {}
   for i = 1, length do
      local limit = (i == 1 and first_max) or #alphabet
      local k = math.random(1, limit)
      out[i] = alphabet:sub(k, k)
   end
   return table.concat(out)
end

function init(args)
   tag = args[1] or tag
   math.randomseed(os.time() + #tag * 7919)
   for i = 1, POOL do
      -- ULID-like: 26 Crockford base32 characters, the first one 0-7 like a real ULID.
      click_ids[i] = random_string(CROCKFORD, 26, 8)
      -- HMAC-SHA256 sized: 64 lowercase hex characters.
      sigs[i] = random_string(HEX, 64)
   end
end

function request()
   counter = counter + 1
   local body = "advertiser_id=acme&event=purchase"
      .. "&click_id=" .. click_ids[counter % POOL + 1]
      .. "&order_id=ORD-" .. tag .. "-" .. counter
      .. "&amount=19.99&currency=USD"
      .. "&ts=" .. os.time()
      .. "&sig=" .. sigs[(counter * 7) % POOL + 1]
   return wrk.format("POST", "/postback", headers, body)
end

-- setup() and done() run in wrk's main environment, separate from the threads'.
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function done(summary, latency, requests)
   -- wrk calls request() once on the first thread before the run to check the script
   -- (script_verify_request); that request never goes on the wire.
   local sent = -1
   for _, thread in ipairs(threads) do
      sent = sent + (thread:get("counter") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"duration_us":%.0f,"requests":%.0f,"bytes":%.0f,"sent":%.0f,'
      .. '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},'
      .. '"latency_us":{"mean":%.1f,"max":%.0f,"p50":%.0f,"p90":%.0f,"p99":%.0f,"p999":%.0f}}\n',
      summary.duration, summary.requests, summary.bytes, sent,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end
