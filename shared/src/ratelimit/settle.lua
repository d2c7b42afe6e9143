-- Corrects the token buckets once the real usage is known: takes (actual - estimated) more, or gives
-- back the difference up to the capacity. Debt is allowed. ARGV[8..11]: estimated input, estimated
-- output, actual input, actual output tokens.
local extra = {[2] = tonumber(ARGV[10]) - tonumber(ARGV[8]), [3] = tonumber(ARGV[11]) - tonumber(ARGV[9])}
for n = 2, 3 do
  if b[n] then b[n].level = math.min(b[n].cap, b[n].level - extra[n]) end
end
save()
return 1
