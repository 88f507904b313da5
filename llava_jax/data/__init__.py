"""Everything from files on disk to a global batch (see docs/design.md, Data flow).

``data`` imports nothing from ``models``: the model follows the numbers reported here
(vocabulary size, image token id, image size).
"""
