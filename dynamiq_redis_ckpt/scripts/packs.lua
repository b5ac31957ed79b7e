-- packs.lua: content packs of one flow with the chains of bases they hold, in one round trip (lists use it).
--
-- KEYS[1]         a pack key of the flow (routes the script to the flow's slot)
-- ARGV[1]         the key prefix of the flow's packs ('P:pack:{F}:'): a pack key is this prefix and a pack id
-- ARGV[2]         how many pack ids follow that are wanted (n)
-- ARGV[3 .. 2+n]  the wanted pack ids;  ARGV[3+n ..]  ids of packs the caller already holds (not sent again)
--
-- Reply: {pack id, pack string or nil, ...}. Read only.

local n = tonumber(ARGV[2])
local wanted, have = {}, {}
for i = 3, 2 + n do
  wanted[#wanted + 1] = ARGV[i]
end
for i = 3 + n, #ARGV do
  have[ARGV[i]] = true
end
return gather(ARGV[1], wanted, have, {})
