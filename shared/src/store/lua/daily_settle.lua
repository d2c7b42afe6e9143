-- Corrects a daily spend counter by (actual - reserved) once a call's usage is known, or gives a
-- reservation back. A counter only changes while it exists, and always expires at the end of its day
-- plus a margin.
-- KEYS: the counter   ARGV: delta micro-USD (may be negative), expiry (Unix s)
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], ARGV[1])
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
end
return 1
