"""The ground floor: errors, devices, progress, the atomic writer, configs (the strict base and the file readers),
the version, the registry's names and the tracking store's checks.

Every other part of lmadda may import from here; nothing here imports from the rest of lmadda.
"""
