-- Corrects the daily spend by (actual - reserved) once a call's usage is known. A counter only
-- changes while it exists, and always expires at the end of its day plus a margin.
-- KEYS: agent day, tenant day   ARGV: delta micro-USD (may be negative), expiry (Unix s)
for i = 1, 2 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], ARGV[1])
    redis.call('EXPIREAT', KEYS[i], ARGV[2])
  end
end
return 1
