import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { CloudletError } from '../errors';
import { replaceFile } from '../system/atomic-file';
import { parseRecipe, recipeJson, type Recipe } from './recipe';

/**
 * Recipes stored on the cloudlet, one JSON file per recipe in `<data>/recipes`, named by the service it makes.
 * Each file is replaced atomically (written aside, renamed in).
 */
export class RecipeStore {
  private readonly recipes = new Map<string, Recipe>();

  constructor(
    private readonly dir: string,
    private readonly log: (line: string) => void,
  ) {}

  async load(): Promise<void> {
    await mkdir(this.dir, { recursive: true, mode: 0o755 });
    for (const entry of await readdir(this.dir)) {
      if (!entry.endsWith('.json')) continue;
      try {
        const recipe = parseRecipe(JSON.parse(await readFile(path.join(this.dir, entry), 'utf8')));
        this.recipes.set(recipe.service_id, recipe);
      } catch (err) {
        this.log(`recipes: skipping ${entry}: ${(err as Error).message}`);
      }
    }
  }

  list(): Recipe[] {
    return [...this.recipes.values()].sort((a, b) => a.service_id.localeCompare(b.service_id));
  }

  get(id: string): Recipe {
    const recipe = this.recipes.get(id);
    if (!recipe) throw new CloudletError('RECIPE_NOT_FOUND', `no recipe for service ${id}`, { details: { recipe_id: id } });
    return recipe;
  }

  /** Store (or replace) a validated recipe. */
  async put(recipe: Recipe): Promise<void> {
    const file = path.join(this.dir, `${recipe.service_id}.json`);
    await replaceFile(file, JSON.stringify(recipeJson(recipe), null, 2) + '\n');
    this.recipes.set(recipe.service_id, recipe);
  }

  async remove(id: string): Promise<void> {
    this.get(id);
    await rm(path.join(this.dir, `${id}.json`), { force: true });
    this.recipes.delete(id);
  }
}
