"""The status of one tensor name in a comparison (a leaf module: imports nothing)."""

UNCHANGED = "unchanged"
CHANGED = "changed"
ADDED = "added"
REMOVED = "removed"
RESHAPED = "reshaped"
RETYPED = "retyped"
#: In an ``inspect`` report every tensor is present on its one side.
PRESENT = "present"

#: The statuses of a two-sided comparison, in report order.
STATUSES = (UNCHANGED, CHANGED, ADDED, REMOVED, RESHAPED, RETYPED)
