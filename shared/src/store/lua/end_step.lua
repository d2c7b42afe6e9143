-- Ends or pauses a session from within a step: terminal statuses, or a wait for a human.
-- Fenced on the lease (-1) and on step and phase (0). KEYS: meta, trace, lease
-- ARGV: step, phase, status, result, error, escalation, now ms, trace record, lease token
local meta, trace = KEYS[1], KEYS[2]
if redis.call('GET', KEYS[3]) ~= ARGV[9] then return -1 end
local f = redis.call('HMGET', meta, 'step', 'phase')
if tonumber(f[1]) ~= tonumber(ARGV[1]) or f[2] ~= ARGV[2] then return 0 end
local status = ARGV[3]
if status == 'awaiting_human' or status == 'awaiting_approval' then
  redis.call('HSET', meta, 'status', status, 'escalation', ARGV[6], 'updated_ms', ARGV[7])
elseif status == 'paused' then
  redis.call('HSET', meta, 'status', status, 'error', ARGV[5], 'updated_ms', ARGV[7])
else
  redis.call('HSET', meta, 'status', status, 'phase', 'done', 'result', ARGV[4], 'error', ARGV[5], 'updated_ms', ARGV[7])
end
redis.call('XADD', trace, 'MAXLEN', '~', 10000, '*', 'r', ARGV[8])
return 1
