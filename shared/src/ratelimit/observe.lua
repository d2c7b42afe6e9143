-- Lowers the buckets to what the provider says remains (never raises them: the account may be shared
-- with callers this fleet does not see). ARGV[9..11]: remaining requests, input, output tokens; ''
-- when the response did not say.
for n = 1, 3 do
  local remaining = tonumber(ARGV[8 + n])
  if b[n] and remaining and remaining < b[n].level then b[n].level = remaining end
end
save(false)
return 1
