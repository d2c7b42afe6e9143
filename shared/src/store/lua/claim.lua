-- Point 1 and 2 of a step (DESIGN §3), in one round trip: decide what a step message means and, when
-- it is the session's current step, take the lease and load meta, messages and ledger.
-- KEYS: meta, msgs, ledger, lease, usage, resv, trace
-- ARGV: step, lease token "<step>|<worker>|<nonce>", lease ms, now ms, session id
local meta, msgs, ledger, lease, usage, resv = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local n = tonumber(ARGV[1])
if redis.call('EXISTS', meta) == 0 then return {'missing', ''} end
local f = redis.call('HMGET', meta, 'status', 'step', 'published')
local status, cur, published = f[1], tonumber(f[2]), tonumber(f[3] or '0')
if status == 'completed' or status == 'failed' or status == 'budget_exhausted' or status == 'cancelled' then
  return {'terminal', status}
end
if status == 'awaiting_human' or status == 'awaiting_approval' then return {'paused', status} end
if n > cur then return {'future', tostring(cur)} end

-- An older step whose successor is known to be in the broker: a duplicate, drop it.
if n < cur and published >= cur then return {'stale', tostring(cur)} end
local holder = redis.call('GET', lease)
if holder then
  -- A holder whose step the session has moved past has finished every state change; only its publish
  -- and ack remain. The message for the current step proves that publish happened: take over.
  local hstep = tonumber(string.match(holder, '^(%d+)|'))
  if not (hstep and hstep < cur and n == cur) then return {'busy', tostring(cur)} end
end
-- The successor of an older step may never have been published (a crash between the checkpoint and
-- the publish): the caller publishes it, then marks it published.
if n < cur then return {'republish', tostring(cur), redis.call('HGET', meta, 'agent')} end
-- A cancel asked for while a step ran takes effect here, at the step boundary: no step is in flight.
if redis.call('HGET', meta, 'cancel') == '1' then
  redis.call('HSET', meta, 'status', 'cancelled', 'phase', 'done', 'error', 'cancelled by request', 'updated_ms', ARGV[4])
  return {'cancelled', '', redis.call('HGETALL', meta)}
end
redis.call('SET', lease, ARGV[2], 'PX', ARGV[3])
if published < n then
  redis.call('HSET', meta, 'status', 'running', 'published', n, 'updated_ms', ARGV[4])
elseif status ~= 'running' then
  redis.call('HSET', meta, 'status', 'running', 'updated_ms', ARGV[4])
end
-- Reservations still open now that we hold the lease belong to calls whose worker died (or lost its
-- lease) before reconciling: the call may have been billed, so count its worst case, once. The
-- reservation stays as `o:<id>`, so that a late reconcile from a worker that was only paused can
-- replace the worst case with what the call really used.
local orphans = redis.call('HGETALL', resv)
for i = 1, #orphans, 2 do
  local cost, input, output = string.match(orphans[i + 1], '^(%d+)|(%d+)|(%d+)$')
  if string.sub(orphans[i], 1, 2) == 'o:' then cost = nil end
  if cost then
    redis.call('HSET', resv, 'o:' .. orphans[i], orphans[i + 1])
    redis.call('HINCRBY', usage, 'cost_micro_usd', cost)
    redis.call('HINCRBY', usage, 'input_tokens', input)
    redis.call('HINCRBY', usage, 'output_tokens', output)
    redis.call('HINCRBY', usage, 'model_calls', 1)
    redis.call('HINCRBY', usage, 'unreconciled_calls', 1)
    local record = cjson.encode({
      ts_ms = tonumber(ARGV[4]), agent_id = redis.call('HGET', meta, 'agent'), session_id = ARGV[5], step = n,
      action = 'model_call', input_summary = 'reservation ' .. orphans[i], output_summary = '',
      input_tokens = tonumber(input), output_tokens = tonumber(output), cost_usd = tonumber(cost) / 1000000,
      cost_micro_usd = tonumber(cost), duration_ms = 0, success = false,
      error = 'the worker died before this call was reconciled: counted at its reserved worst case',
      worker = string.match(ARGV[2], '^%d+|([^|]*)|') or '',
      reservation = orphans[i]
    })
    redis.call('XADD', KEYS[7], 'MAXLEN', '~', 10000, '*', 'r', record)
    redis.call('HDEL', resv, orphans[i])
  end
end
-- The worst case of this step's model call, as the checkpoint that made the step current planned it
-- (`resv_next`, "<step>|cost|input|output"): held under our token from now on, so a call made under
-- this lease is covered without another round trip. The worker compares it with its own plan and
-- reserves again when they differ (a changed price, an orphan counted just now).
local planned = ''
if redis.call('HGET', meta, 'phase') == 'llm' then
  local s, value = string.match(redis.call('HGET', meta, 'resv_next') or '', '^(%d+)|(%d+|%d+|%d+)$')
  if tonumber(s) == n then
    redis.call('HSET', resv, ARGV[2], value)
    planned = value
  end
end
return {'run', planned, redis.call('HGETALL', meta), redis.call('LRANGE', msgs, 0, -1), redis.call('HGETALL', ledger),
  redis.call('HGETALL', usage)}
