-- The outcome of a call that `check` let through. Returns the transition: '', 'opened', 'closed' or
-- 'reopened'. A closed breaker without failures has no key at all.
-- KEYS: breaker   ARGV: now ms, was probe (0|1), success (0|1), failure threshold, cool-down ms, key ttl ms
local key = KEYS[1]
local now, was_probe, success = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3] == '1'
local threshold, cool_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local f = redis.call('HMGET', key, 'state', 'failures')
local state, failures = f[1] or 'closed', tonumber(f[2] or '0')
local function open(count)
  redis.call('HSET', key, 'state', 'open', 'failures', count, 'until', string.format('%.0f', now + cool_ms))
  redis.call('PEXPIRE', key, ARGV[6])
end
if state == 'closed' then
  if success then
    -- Any success anywhere in the fleet ends the run of consecutive failures.
    if failures > 0 then redis.call('DEL', key) end
    return ''
  end
  failures = failures + 1
  if failures >= threshold then
    open(failures)
    return 'opened'
  end
  redis.call('HSET', key, 'state', 'closed', 'failures', failures)
  redis.call('PEXPIRE', key, ARGV[6])
  return ''
end
if state == 'half_open' and was_probe then
  if success then
    redis.call('DEL', key)
    return 'closed'
  end
  open(failures + 1)
  return 'reopened'
end
-- Open, or a plain call reporting while half-open: it started before the breaker opened. It must
-- neither extend the cool-down nor decide the probe's question.
return ''
