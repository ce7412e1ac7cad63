"""Every private attribute of torch-pruning and Lightning that HalfPrune touches, behind one name each.

Moving to a new release of either means reading these two files, not the whole package; ``tests/test_layout.py``
checks that no other module reaches into their private names and that each name here still exists.
"""
