-- packs.lua: content packs of one flow with the chains of bases they hold, in one round trip (lists use it).
--
-- KEYS            the pack keys of the flow it may read: the wanted packs and the chains the caller knows of
-- ARGV[1]         the key prefix of the flow's packs ('P:pack:{F}:'): a pack key is this prefix and a pack id
-- ARGV[2]         how many pack ids follow that are wanted (n)
-- ARGV[3 .. 2+n]  the wanted pack ids;  ARGV[3+n ..]  ids of packs the caller already holds (not sent again)
--
-- Reply: {{pack id, pack string or nil, ...}, {pack id, base id, ...}, {key, ...}}: the packs of the declared keys,
-- then the links to bases whose keys were not declared and the keys still to declare (see _packs.lua). Read only.

local n = tonumber(ARGV[2])
local wanted, have = {}, {}
for i = 3, 2 + n do
  wanted[#wanted + 1] = ARGV[i]
end
for i = 3 + n, #ARGV do
  have[ARGV[i]] = true
end
local packs = gather(ARGV[1], wanted, have, {})
return {packs, needed_links, needed_keys}
