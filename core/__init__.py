"""The ground floor: the contract (``spec``), the typed registry, result records and file
helpers (atomic writes, locks). Every other package imports down to it; it imports none of
them."""
