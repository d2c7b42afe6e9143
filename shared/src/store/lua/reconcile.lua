-- Replaces a call's reservation with its actual usage, once, and traces the call. Not fenced: the
-- call was billed whatever happened to the step since. A reservation another claim already counted
-- at its worst case (the worker was paused past its lease) is corrected to the actual usage.
-- KEYS: usage, resv, trace
-- ARGV: reservation id, input, output, cache write, cache read tokens, cost micro-USD, trace record
return reconcile() or {}
