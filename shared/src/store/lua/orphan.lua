-- Shared prelude of reconcile.lua and cancel_reservation.lua (Rust prepends it): when the claim of
-- another worker has already counted this call's reservation at its worst case (an orphan, `o:<id>`),
-- take that worst case back out, so the caller can count what the call really cost, once.
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
