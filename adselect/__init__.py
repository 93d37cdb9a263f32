"""adselect core: settings, domain types, errors and the selection pipeline shared by server/ and eval/."""
