-- Corrects the daily spend by (actual - reserved) once a call's usage is known.
-- KEYS: agent day, tenant day   ARGV: delta micro-USD (may be negative)
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[1]) end
end
return 1
