"""One router per resource; each route validates, calls one function and returns a schema."""
