-- Corrects the token buckets once the real usage is known: takes (actual - estimated) more, or gives
-- back the difference up to the capacity. Debt is allowed. ARGV[9..12]: estimated input, estimated
-- output, actual input, actual output tokens.
local extra = {[2] = tonumber(ARGV[11]) - tonumber(ARGV[9]), [3] = tonumber(ARGV[12]) - tonumber(ARGV[10])}
for n = 2, 3 do
  if b[n] then b[n].level = math.min(b[n].cap, b[n].level - extra[n]) end
end
save(false)
return 1
