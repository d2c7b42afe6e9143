-- Cancels a session. One that is not running stops at once; a running one is flagged, and the
-- claim of its next step ends it, so a step in flight is never cut mid-write.
-- KEYS: meta   ARGV: now ms
-- Returns {'cancelled'|'requested'|'ended'|'missing', status}.
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing', ''} end
if st == 'completed' or st == 'failed' or st == 'budget_exhausted' or st == 'cancelled' then return {'ended', st} end
if st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return {'requested', st}
end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'phase', 'done', 'cancel', '1', 'error', 'cancelled by request',
  'updated_ms', ARGV[1])
redis.call('HDEL', KEYS[1], 'escalation')
return {'cancelled', st}
