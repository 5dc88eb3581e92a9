"""The ground floor: errors, devices, progress, the atomic writer, the config base and the version.

Every other part of lmadda may import from here; nothing here imports from the rest of lmadda.
"""
