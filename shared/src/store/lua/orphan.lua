-- Shared prelude of reconcile.lua, commit_model.lua and cancel_reservation.lua (Rust prepends it):
-- when the claim of another worker has already counted this call's reservation at its worst case (an
-- orphan, `o:<id>`), take that worst case back out, so the caller can count what the call really
-- cost, once.
-- KEYS[1]: usage, KEYS[2]: resv; ARGV[1]: reservation id. Returns 'open' when the reservation was
-- open, 'orphan' when it was an orphan now taken back (the caller's trace record then supersedes the
-- claim's worst-case record), false when the call was already counted.
local function take_reservation()
  if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 then return 'open' end
  local orphan = 'o:' .. ARGV[1]
  local worst = redis.call('HGET', KEYS[2], orphan)
  if not worst then return false end
  local cost, input, output = string.match(worst, '^(%d+)|(%d+)|(%d+)$')
  redis.call('HDEL', KEYS[2], orphan)
  if not cost then return false end
  redis.call('HINCRBY', KEYS[1], 'cost_micro_usd', -tonumber(cost))
  redis.call('HINCRBY', KEYS[1], 'input_tokens', -tonumber(input))
  redis.call('HINCRBY', KEYS[1], 'output_tokens', -tonumber(output))
  redis.call('HINCRBY', KEYS[1], 'model_calls', -1)
  redis.call('HINCRBY', KEYS[1], 'unreconciled_calls', -1)
  return 'orphan'
end

-- The trace record `record`, marked as superseding the worst-case record of this reservation when
-- `taken` is 'orphan' (so trace totals keep matching the usage).
local function superseding(record, taken)
  if taken ~= 'orphan' then return record end
  local ok, r = pcall(cjson.decode, record)
  if not ok or type(r) ~= 'table' then return record end
  r.supersedes = ARGV[1]
  return cjson.encode(r)
end

-- Replaces the call's reservation with its actual usage (ARGV[2..6]: input, output, cache write,
-- cache read tokens, cost micro-USD as `total` or `total:input:output:cache write:cache read`), once,
-- and appends its trace record (ARGV[7]; KEYS[3]: trace). Returns the usage totals after it, or
-- false when the call was already counted.
local function reconcile()
  local taken = take_reservation()
  if not taken then return false end
  redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'cache_creation_input_tokens', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'cache_read_input_tokens', ARGV[5])
  local total, input, output, write, read = string.match(ARGV[6], '^(%d+):(%d+):(%d+):(%d+):(%d+)$')
  if total then
    redis.call('HINCRBY', KEYS[1], 'cost_input_micro_usd', input)
    redis.call('HINCRBY', KEYS[1], 'cost_output_micro_usd', output)
    redis.call('HINCRBY', KEYS[1], 'cost_cache_write_micro_usd', write)
    redis.call('HINCRBY', KEYS[1], 'cost_cache_read_micro_usd', read)
  end
  redis.call('HINCRBY', KEYS[1], 'cost_micro_usd', total or ARGV[6])
  redis.call('HINCRBY', KEYS[1], 'model_calls', 1)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', 'r', superseding(ARGV[7], taken))
  return redis.call('HGETALL', KEYS[1])
end
