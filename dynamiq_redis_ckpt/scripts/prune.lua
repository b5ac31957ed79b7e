-- prune.lua: drop index entries whose checkpoint has expired (or, for a lease index, whose lease clear() deleted);
-- entries still backed by a hash stay.
--
-- KEYS[1]      an index (zset)
-- KEYS[2 .. n] the checkpoint hashes (leases) of the candidate entries
-- ARGV[1 .. n-1] the candidate ids, aligned with KEYS[2 .. n]
--
-- Reply: number of entries removed.

local removed = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i - 1])
  end
end
return removed
