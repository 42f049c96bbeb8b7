"""The send path: accept, queue, dispatch, sweep."""
