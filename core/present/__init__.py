"""What the app shows, one module per page: that page's tables (views) and its charts (figures).

``overview``, ``importance_map``, ``layer_lab``, ``clipping``, ``compare``, ``model_quality``, ``how_awq_works``,
``methods`` and ``plan`` match ``pages/*.py``; ``surface`` is the Importance map's 3D view and ``pack`` the figure
pack. ``common`` holds what more than one page uses: the chart theme, :class:`common.Figure` (a chart plus the
table it draws) and its exports, shared tables, formats and helpers. A page's module imports ``common``, never
another page's; nothing here imports streamlit.
"""
