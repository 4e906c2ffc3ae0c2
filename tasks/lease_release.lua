-- Release a lease, but only if the caller still holds it.
--
-- KEYS[1]  string: the lease, whose value is the owner's id
-- ARGV[1]  owner: the id the caller acquired the lease with
--
-- Returns 1 if the lease was deleted, 0 if it had expired or another owner holds it now (a
-- plain DEL would then free someone else's lease).

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
