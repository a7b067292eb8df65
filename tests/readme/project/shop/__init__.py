"""A new user's project, as the README's examples assume it (`shop.app`, `shop.mailer`,
`shop.tasks`): the README test copies it next to the examples it runs."""
