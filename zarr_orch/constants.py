"""Module-level constants shared by the whole package.

The names and values follow CNES CARS (``cars/data_structures/cars_dataset.py``
and ``cars/core/constants.py``) so that CARS-style application code reads the same.
"""

# --- CarsDataset types: what kind of object each tile is --------------------
#: tiles are ``xarray.Dataset`` (rasters)
CARS_DS_TYPE_ARRAY = "arrays"
#: tiles are ``pandas.DataFrame`` (point clouds)
CARS_DS_TYPE_POINTS = "points"
#: tiles are ``CarsDict`` (free Python payloads)
CARS_DS_TYPE_DICT = "dict"
#: every allowed ``CarsDataset.dataset_type``
DATASET_TYPES = (CARS_DS_TYPE_ARRAY, CARS_DS_TYPE_POINTS, CARS_DS_TYPE_DICT)

# --- Keys of a tile's ``.attrs``: metadata carried by every tile -------------
#: routing key ``{"cars_ds_key", "cars_ds_row", "cars_ds_col"}``
SAVING_INFO = "saving_info"
#: core window (no overlap) ``{"row_min", "row_max", "col_min", "col_max"}``
WINDOW = "window"
#: margins included in the tile ``{"up", "down", "left", "right"}``
OVERLAPS = "overlaps"
#: profile (rasterio-like) of the full output raster
PROFILE = "profile"
#: free application dict
ATTRIBUTES = "attributes"

# --- Keys of a saving-info dict: which dataset and cell a tile belongs to ----
CARS_DS_KEY = "cars_ds_key"
CARS_DS_ROW = "cars_ds_row"
CARS_DS_COL = "cars_ds_col"

# --- Keys of a window dict: half-open pixel bounds [min, max) ----------------
ROW_MIN = "row_min"
ROW_MAX = "row_max"
COL_MIN = "col_min"
COL_MAX = "col_max"

# --- Keys of an overlaps dict: margins in pixels, in grid array order --------
UP = "up"
DOWN = "down"
LEFT = "left"
RIGHT = "right"

# --- Dimension names of raster tiles -----------------------------------------
ROW = "row"
COL = "col"
BAND = "band"
