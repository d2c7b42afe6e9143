-- Applies a wait's deadline: fails the session, or hands an approval to a human.
-- KEYS: meta   ARGV: expected status, new status, error, escalation JSON, now ms
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= ARGV[1] then return 0 end
if ARGV[2] == 'awaiting_human' then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'escalation', ARGV[4], 'updated_ms', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'phase', 'done', 'error', ARGV[3], 'updated_ms', ARGV[5])
  redis.call('HDEL', KEYS[1], 'escalation')
end
return 1
