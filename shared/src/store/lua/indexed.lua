-- Notes which listing index holds the session (after the indexes moved) and, once it has ended,
-- starts its retention: every key of it expires then. A session already gone is not recreated.
-- KEYS: meta, msgs, usage, ledger, trace, lease, resv   ARGV: index class, retention ms (0: none)
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'indexed', ARGV[1])
local ms = tonumber(ARGV[2])
if ms > 0 then
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ms) end
end
return 1
